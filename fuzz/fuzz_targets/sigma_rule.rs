#![no_main]
//! Fuzz target `sigma_rule`: see `picket::fuzzing::sigma_rule`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| picket::fuzzing::sigma_rule(data));

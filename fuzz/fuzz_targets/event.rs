#![no_main]
//! Fuzz target `event`: see `picket::fuzzing::event`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| picket::fuzzing::event(data));

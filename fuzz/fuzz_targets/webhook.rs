#![no_main]
//! Fuzz target `webhook`: see `picket::fuzzing::webhook`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| picket::fuzzing::webhook(data));

#![no_main]
//! Fuzz target `cursor`: see `picket::fuzzing::cursor`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| picket::fuzzing::cursor(data));

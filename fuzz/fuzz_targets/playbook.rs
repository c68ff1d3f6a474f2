#![no_main]
//! Fuzz target `playbook`: see `picket::fuzzing::playbook`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| picket::fuzzing::playbook(data));

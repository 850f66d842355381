#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ambit::fuzzing::cidr(data);
});

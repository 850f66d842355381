//! Empty library target: lets `userspace/ambit` name this crate as a build-dependency, so cargo
//! re-runs its build script (which builds the programs in `main.rs`) when this crate changes.
#![no_std]

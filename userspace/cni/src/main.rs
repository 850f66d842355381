//! `ambit-cni`, Ambit's chained CNI plugin: see the `plugin` module.

fn main() -> std::process::ExitCode {
    ambit_cni::plugin::main()
}

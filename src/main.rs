fn main() -> std::process::ExitCode {
    hangar::cli::main()
}

//! The Jupyter kernel lands in its own issue; this crate exists so the workspace layout is final.
fn main() {
    eprintln!("diffexplainer-kernel: not built yet (the kernel is a later milestone)");
    std::process::exit(2);
}

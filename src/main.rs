//! The kernel image. All the work is in the library; this file only gives the linker an entry.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
use dmakern as _;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("dmakern is a kernel image: build and boot it with ./qemu-run.sh");
    std::process::exit(2);
}

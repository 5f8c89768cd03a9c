//! Builds the small C layer over libibverbs when the `rdma` feature is on.
fn main() {
    println!("cargo:rerun-if-changed=src/rdma/shim.c");
    #[cfg(feature = "rdma")]
    {
        cc::Build::new().file("src/rdma/shim.c").warnings(true).extra_warnings(true).compile("mosaic_rdma_shim");
        println!("cargo:rustc-link-lib=ibverbs");
    }
}

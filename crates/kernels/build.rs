//! Compiles the CUDA kernels in `cuda/*.cu` to PTX when the `cuda` feature is on; the CPU build
//! needs no CUDA toolkit and does nothing here.
//!
//! nvcc is found like candle's build finds it: `$NVCC`, else `bin/nvcc` under `$CUDA_ROOT`,
//! `$CUDA_PATH` or `$CUDA_HOME`, else `nvcc` on PATH (scripts/build-cuda.sh sets PATH and
//! CUDA_HOME to the PyPI toolkit). The PTX targets `sm_$CUDA_COMPUTE_CAP` (default 90, H100 /
//! H200); the driver JIT-compiles it at module load. Each PTX file is then run through
//! `ptxas` for the same architecture, so that what the JIT would reject (too many registers,
//! bad PTX) fails this build on a machine without a GPU instead of at run time on one; its
//! resource report (registers, spills per kernel) is kept as `OUT_DIR/<name>.ptxas.txt`.
//!
//! scripts/check-cuda-ptx.sh runs the same two commands, with the same flags, without cargo
//! (for CI); keep the flags of the two in step.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources, one PTX module each (src/cuda.rs embeds them by these names).
const MODULES: &[&str] = &["depthwise", "rows", "elementwise", "attention", "flash", "roi_align"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_HOME", "CUDA_COMPUTE_CAP", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let src_dir = manifest.join("cuda");
    println!("cargo:rerun-if-changed={}", src_dir.display());
    for entry in std::fs::read_dir(&src_dir).expect("crates/kernels/cuda exists") {
        println!("cargo:rerun-if-changed={}", entry.unwrap().path().display());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let nvcc = find_nvcc();
    let arch = format!("sm_{}", compute_cap());
    let ptxas = sibling_tool(&nvcc, "ptxas");

    for module in MODULES {
        let cu = src_dir.join(format!("{module}.cu"));
        let ptx = out_dir.join(format!("{module}.ptx"));
        let mut cmd = Command::new(&nvcc);
        // No --use_fast_math: erff, expf, sqrtf and the divisions must stay IEEE-accurate for
        // the kernels to agree with the CPU ones to f32 rounding.
        cmd.args(["--ptx", "-O3", "-std=c++17", &format!("-arch={arch}")])
            .arg("-I")
            .arg(&src_dir)
            .arg("-o")
            .arg(&ptx)
            .arg(&cu);
        if let Ok(ccbin) = env::var("NVCC_CCBIN") {
            cmd.arg("-ccbin").arg(ccbin);
        }
        run(&mut cmd, &format!("nvcc: compiling {}", cu.display()));

        let report = Command::new(&ptxas)
            .args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"])
            .arg(&ptx)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", ptxas.display()));
        let text = format!("{}{}", String::from_utf8_lossy(&report.stdout), String::from_utf8_lossy(&report.stderr));
        if !report.status.success() {
            panic!("ptxas -arch={arch} rejected {}:\n{text}", ptx.display());
        }
        std::fs::write(out_dir.join(format!("{module}.ptxas.txt")), &text).unwrap();
        // Spills are legal but slow: say so at build time rather than find out in a profile.
        for line in text.lines().filter(|l| l.contains("spill") && !l.contains(" 0 bytes spill stores")) {
            println!("cargo:warning={module}.cu: ptxas: {}", line.trim());
        }
    }
}

fn compute_cap() -> String {
    match env::var("CUDA_COMPUTE_CAP") {
        // Accept "90" and "9.0" (nvidia-smi's compute_cap spelling).
        Ok(v) if !v.trim().is_empty() => {
            let digits: String = v.trim().chars().filter(|c| c.is_ascii_digit()).collect();
            assert!(!digits.is_empty(), "CUDA_COMPUTE_CAP='{v}' is not a compute capability like 90");
            digits
        }
        _ => "90".to_string(),
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env::var_os(var) {
            let candidate = Path::new(&root).join("bin").join("nvcc");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let candidate = dir.join("nvcc");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the `cuda` feature needs nvcc to compile crates/kernels/cuda/*.cu: set NVCC, CUDA_ROOT or CUDA_HOME, \
         or put nvcc on PATH (scripts/build-cuda.sh installs one from PyPI)"
    );
}

/// `ptxas` next to nvcc (both ship in the toolkit's bin/), else whatever PATH has.
fn sibling_tool(nvcc: &Path, name: &str) -> PathBuf {
    match nvcc.parent() {
        Some(dir) if dir.join(name).is_file() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| panic!("{what}: cannot run {:?}: {e}", cmd.get_program()));
    if !status.success() {
        panic!("{what}: failed ({status})");
    }
}

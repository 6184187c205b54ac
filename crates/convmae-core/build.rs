fn main() {
    // Only the N-API build needs the node link arguments.
    if std::env::var_os("CARGO_FEATURE_NODE").is_some() {
        napi_build::setup();
    }
}

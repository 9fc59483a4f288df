//! The C ABI: the only place with `extern "C"`, panic boundaries and raw-pointer validation.

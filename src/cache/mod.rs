//! The managed cache: pools (owned or borrowed), page allocator and sequence slots.

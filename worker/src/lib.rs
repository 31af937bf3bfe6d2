//! Quarry worker library.

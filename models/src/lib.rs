//! Models on the mvar engine.

pub use mvar_engine as engine;

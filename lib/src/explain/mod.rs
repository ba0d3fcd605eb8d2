//! DiffExplainer itself: what to maximize ([`objective`]), the soft prompt, the optimization
//! loop and its records.

pub mod objective;

pub use objective::Objective;

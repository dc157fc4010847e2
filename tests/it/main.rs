//! lockjam's integration tests: one binary, real PostgreSQL clusters
//! started by the fixture in `support`.

mod endpoint;
mod fleet;
mod history;
mod incidents;
mod monitoring;
mod page;
mod policy;
mod preflight;
mod robustness;
mod safety;
mod scale;
mod scenes;
mod security;
mod service;
mod standby;
mod support;
mod tls;
mod tree;
mod versions;

//! Scheduling and controllers: the scheduler and its filter/score pipeline. (Controllers for
//! Deployments join here.)

pub mod plugins;
pub mod scheduler;

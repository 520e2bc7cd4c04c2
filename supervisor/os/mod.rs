//! The supervisor's OS access: spawning with a parent-death signal and a cgroup, signals to
//! process groups, the subreaper and reaping (unix.rs); its cgroup subtree (cgroup.rs); how a
//! daemon's or job's processes are contained and stopped, by cgroup or by process group plus
//! environment (containment.rs). The readers it shares with the worker are in `ringrift::os`.

pub(crate) mod cgroup;
pub(crate) mod containment;
pub(crate) mod unix;

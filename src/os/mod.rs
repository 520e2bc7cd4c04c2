//! What the library reads from the operating system: /proc (processes, CPU, memory, load) and the
//! cgroup v2 file system. Everything else that touches the OS (spawning, signals, prctl, cgroup
//! writes) is the supervisor's, in supervisor/os/.

pub mod cgroupfs;
pub mod procfs;

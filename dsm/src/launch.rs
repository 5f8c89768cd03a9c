//! Where a node learns its place in the job: from `mosrun -n` (`MOSAIC_DSM_*`), Open MPI's
//! `mpirun` (`OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`), Slurm's `srun` (`SLURM_PROCID`,
//! `SLURM_NTASKS`) or an MPICH/Hydra `mpiexec` (`PMI_RANK`, `PMI_SIZE`), in that order.
//!
//! The nodes meet at `MOSAIC_DSM_RENDEZVOUS` where set: a directory, a rendezvous server's
//! `tcp://HOST:PORT` (`mosrun --hosts` runs one), or a node agent's `agent+tcp://HOST:PORT/JOB`
//! (see [`crate::rendezvous`]; under Open MPI and Slurm `/JOB` may be left out, the job's name
//! is taken: one `MOSAIC_DSM_RENDEZVOUS=agent+tcp://HEAD:7070` serves every job on every
//! host). Else, under Open MPI
//! and Slurm, in a directory named after the job (`PMIX_NAMESPACE` or Open MPI's job id;
//! `SLURM_JOB_ID.SLURM_STEP_ID`) in the temporary directory, which serves nodes on one host (on
//! several, set `MOSAIC_DSM_RENDEZVOUS` to a directory they share, and `MOSAIC_DSM_LISTEN` on
//! each). Hydra gives no job name in the environment: set `MOSAIC_DSM_RENDEZVOUS` there.

use crate::rendezvous::Rendezvous;

use crate::job::JoinError;
use crate::protocol::NodeId;

/// What started this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// `mosrun -n`, or the `MOSAIC_DSM_*` variables set by hand.
    Mosaic,
    /// Open MPI's `mpirun`.
    OpenMpi,
    /// Slurm's `srun`.
    Slurm,
    /// An MPICH/Hydra `mpiexec` (PMI).
    Pmi,
}

/// This node's place in its job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// This node's rank.
    pub rank: NodeId,
    /// Nodes in the job.
    pub size: u16,
    /// Where the nodes meet.
    pub rendezvous: Rendezvous,
    /// Whether the rendezvous directory was named here after the job (and is removed once
    /// empty), not given.
    pub derived: bool,
    /// What started this process.
    pub launcher: Launcher,
}

/// The rank variable of `mosrun -n`.
pub const RANK_ENV: &str = "MOSAIC_DSM_RANK";
/// The size variable of `mosrun -n`.
pub const SIZE_ENV: &str = "MOSAIC_DSM_SIZE";
/// The rendezvous directory or server (set by `mosrun -n`; overrides any other launcher's).
pub const RENDEZVOUS_ENV: &str = "MOSAIC_DSM_RENDEZVOUS";

/// This node's place, from the environment `get` reads (the process's, in [`from_env`]).
pub fn placement(get: &dyn Fn(&str) -> Option<String>) -> Result<Placement, JoinError> {
    let number = |name: &'static str| -> Result<u16, JoinError> {
        let v = get(name).ok_or(JoinError::Environment { name, why: "not set" })?;
        v.trim().parse().map_err(|_| JoinError::Environment { name, why: "not a number from 0 to 65535" })
    };
    let given = get(RENDEZVOUS_ENV).filter(|d| !d.is_empty()).map(|d| Rendezvous::parse(&d));
    let (launcher, rank, size, job) = if get(RANK_ENV).is_some() {
        (Launcher::Mosaic, number(RANK_ENV)?, number(SIZE_ENV)?, None)
    } else if get("OMPI_COMM_WORLD_RANK").is_some() {
        let job =
            get("PMIX_NAMESPACE").or_else(|| get("OMPI_MCA_ess_base_jobid")).or_else(|| get("OMPI_MCA_orte_ess_jobid"));
        (
            Launcher::OpenMpi,
            number("OMPI_COMM_WORLD_RANK")?,
            number("OMPI_COMM_WORLD_SIZE")?,
            job.map(|j| format!("ompi-{j}")),
        )
    } else if get("SLURM_PROCID").is_some() {
        let job = get("SLURM_JOB_ID").map(|j| format!("slurm-{j}.{}", get("SLURM_STEP_ID").unwrap_or_default()));
        (Launcher::Slurm, number("SLURM_PROCID")?, number("SLURM_NTASKS")?, job)
    } else if get("PMI_RANK").is_some() {
        (Launcher::Pmi, number("PMI_RANK")?, number("PMI_SIZE")?, None)
    } else {
        return Err(JoinError::Environment {
            name: RANK_ENV,
            why: "not set, and no Open MPI, Slurm or PMI rank either: start the job with mosrun -n, mpirun or srun",
        });
    };
    let job = job.map(|j| job_name(&j));
    let (rendezvous, derived) =
        match (given, job) {
            // An agent's book without a job name: the launcher's names it.
            (Some(Rendezvous::Agent { agent, job: given_job }), Some(job)) if given_job.is_empty() => {
                (Rendezvous::Agent { agent, job }, false)
            }
            (Some(Rendezvous::Agent { job, .. }), None) if job.is_empty() => {
                return Err(JoinError::Environment {
                    name: RENDEZVOUS_ENV,
                    why: "names an agent without a job (agent+tcp://HOST:PORT/JOB): this launcher gives no job name",
                })
            }
            (Some(d), _) => (d, false),
            (None, Some(job)) => (Rendezvous::Dir(std::env::temp_dir().join(format!("mosaic-dsm-{job}"))), true),
            (None, None) => return Err(JoinError::Environment {
                name: RENDEZVOUS_ENV,
                why: "not set (a directory every node of the job can reach, or a rendezvous server's tcp://HOST:PORT)",
            }),
        };
    Ok(Placement { rank, size, rendezvous, derived, launcher })
}

/// A launcher's job name as a file name and an agent's book name: letters, digits, `-_.`
/// (anything else becomes `_`); a long one is cut, with a hash of the whole so that names that
/// differ only past the cut stay apart.
fn job_name(raw: &str) -> String {
    const LONGEST: usize = 100;
    let name: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if name.len() <= LONGEST {
        return name;
    }
    // FNV-1a of the raw name.
    let hash = raw.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{}-{hash:016x}", &name[..LONGEST - 17])
}

/// This node's place, from the process's environment.
pub fn from_env() -> Result<Placement, JoinError> {
    placement(&|name| std::env::var(name).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn every_launcher_is_understood() {
        let p = placement(&env(&[(RANK_ENV, "2"), (SIZE_ENV, "4"), (RENDEZVOUS_ENV, "/x")])).unwrap();
        assert_eq!(
            (p.launcher, p.rank, p.size, p.rendezvous, p.derived),
            (Launcher::Mosaic, 2, 4, Rendezvous::Dir("/x".into()), false)
        );
        let p = placement(&env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("PMIX_NAMESPACE", "prterun-h-12@1"),
        ]))
        .unwrap();
        assert_eq!((p.launcher, p.rank, p.size, p.derived), (Launcher::OpenMpi, 1, 2, true));
        assert!(p.rendezvous.to_string().ends_with("mosaic-dsm-ompi-prterun-h-12_1"), "{:?}", p.rendezvous);
        let p = placement(&env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_JOB_ID", "77"),
            ("SLURM_STEP_ID", "0"),
        ]))
        .unwrap();
        assert_eq!((p.launcher, p.rank, p.size), (Launcher::Slurm, 3, 8));
        assert!(p.rendezvous.to_string().ends_with("mosaic-dsm-slurm-77.0"));
        // A rendezvous given wins over a derived one.
        let p = placement(&env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_JOB_ID", "7"),
            (RENDEZVOUS_ENV, "/shared"),
        ]))
        .unwrap();
        assert_eq!((p.rendezvous, p.derived), (Rendezvous::Dir("/shared".into()), false));
        let p = placement(&env(&[(RANK_ENV, "0"), (SIZE_ENV, "2"), (RENDEZVOUS_ENV, "tcp://10.1.2.3:4000")])).unwrap();
        assert_eq!(p.rendezvous, Rendezvous::Server("tcp://10.1.2.3:4000".into()));
        let p = placement(&env(&[("PMI_RANK", "0"), ("PMI_SIZE", "2"), (RENDEZVOUS_ENV, "/r")])).unwrap();
        assert_eq!(p.launcher, Launcher::Pmi);
        // An agent's book takes the launcher's job name when it gives none.
        let p = placement(&env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_ID", "9"),
            ("SLURM_STEP_ID", "1"),
            (RENDEZVOUS_ENV, "agent+tcp://10.0.0.1:7070"),
        ]))
        .unwrap();
        assert_eq!(p.rendezvous, Rendezvous::agent("tcp://10.0.0.1:7070", "slurm-9.1"));
        let p = placement(&env(&[(RANK_ENV, "0"), (SIZE_ENV, "2"), (RENDEZVOUS_ENV, "agent+tcp://h:1/mine")])).unwrap();
        assert_eq!(p.rendezvous, Rendezvous::agent("tcp://h:1", "mine"));
        let e = placement(&env(&[("PMI_RANK", "0"), ("PMI_SIZE", "2"), (RENDEZVOUS_ENV, "agent+tcp://h:1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gives no job name"), "{e}");
        // Long names are cut, and stay apart.
        let (a, b) = (job_name(&format!("{}a", "x".repeat(200))), job_name(&format!("{}b", "x".repeat(200))));
        assert!(a.len() <= 100 && b.len() <= 100 && a != b, "{a} {b}");
        assert_eq!(job_name("prterun-h-12@1"), "prterun-h-12_1");
    }

    #[test]
    fn what_is_missing_is_named() {
        let e = placement(&env(&[])).unwrap_err().to_string();
        assert!(e.contains("MOSAIC_DSM_RANK") && e.contains("mpirun"), "{e}");
        let e = placement(&env(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")])).unwrap_err().to_string();
        assert!(e.contains("MOSAIC_DSM_RENDEZVOUS"), "{e}");
        let e = placement(&env(&[(RANK_ENV, "x"), (SIZE_ENV, "2"), (RENDEZVOUS_ENV, "/r")])).unwrap_err().to_string();
        assert!(e.contains("MOSAIC_DSM_RANK: not a number"), "{e}");
        let e = placement(&env(&[("OMPI_COMM_WORLD_RANK", "0")])).unwrap_err().to_string();
        assert!(e.contains("OMPI_COMM_WORLD_SIZE: not set"), "{e}");
    }
}

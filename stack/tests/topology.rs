//! Provisioning runs that start at the same moment on a fresh broker (two
//! operators, or a retried compose step) each apply the definitions; every
//! one of them must succeed.

use anyhow::Result;
use common::{Subjects, topology};
use stack::infra::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_runs_starting_together_on_a_fresh_broker_all_succeed() -> Result<()> {
    for round in 0..10 {
        let nats = NatsServer::start().await?;
        let subjects = Subjects::new(format!("race{round}"));
        let mut starting = Vec::new();
        for _ in 0..4 {
            let client = async_nats::connect(nats.url()).await?;
            let subjects = subjects.clone();
            starting.push(tokio::spawn(async move {
                topology::provision(&async_nats::jetstream::new(client), &subjects, 1).await
            }));
        }
        for s in starting {
            s.await??;
        }
    }
    Ok(())
}

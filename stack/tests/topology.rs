//! Services that start at the same moment on a fresh broker each apply the
//! stream definitions; every one of them must succeed.

use anyhow::Result;
use common::{Subjects, topology};
use stack::infra::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_starting_together_on_a_fresh_broker_all_get_their_streams() -> Result<()> {
    for round in 0..10 {
        let nats = NatsServer::start().await?;
        let subjects = Subjects::new(format!("race{round}"));
        let mut starting = Vec::new();
        for _ in 0..16 {
            let client = async_nats::connect(nats.url()).await?;
            let subjects = subjects.clone();
            starting.push(tokio::spawn(async move {
                topology::apply_streams(&async_nats::jetstream::new(client), &subjects, 1).await
            }));
        }
        for s in starting {
            s.await??;
        }
    }
    Ok(())
}

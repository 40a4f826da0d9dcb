//! Cluster routes authenticate: a server that reaches a node's route port
//! without the route password is refused and never joins (joined, it would
//! relay every subject and bypass every user's permissions); one that has
//! the password joins.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use saga_tests::{DEADLINE, NatsCluster};
use tokio::process::{Child, Command};

/// A server outside the cluster that solicits a route to `route`, logging
/// to `log`; its monitoring port.
fn outsider(route: &str, log: &Path) -> Result<(Child, u16)> {
    let ports = stack::infra::free_ports(3)?;
    let child = Command::new(stack::infra::nats_server_bin())
        .args(["-a", "127.0.0.1", "-p", &ports[0].to_string()])
        .args(["-m", &ports[1].to_string()])
        .args(["--cluster_name", "saga"])
        .args(["--cluster", &format!("nats://127.0.0.1:{}", ports[2])])
        .args(["--routes", route])
        .arg("-l")
        .arg(log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawn nats-server")?;
    Ok((child, ports[1]))
}

/// The routes a server has, as its monitoring endpoint says.
async fn routes_of(monitor: u16) -> Result<Option<u64>> {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{monitor}/routez")).await else {
        return Ok(None);
    };
    let v: serde_json::Value = r.json().await?;
    Ok(v["num_routes"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_route_password_cannot_join_the_cluster() -> Result<()> {
    let cluster = NatsCluster::start(None).await?;
    let node = &cluster.routes()[0];
    let dir = std::env::temp_dir().join(format!("routes-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;

    let (_rogue, rogue_monitor) = outsider(&format!("nats://{node}"), &dir.join("rogue.log"))?;
    let refused = "Route Error 'Authorization Violation'";
    let deadline = Instant::now() + DEADLINE;
    while !std::fs::read_to_string(dir.join("rogue.log"))
        .unwrap_or_default()
        .contains(refused)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the node never refused the route without the password"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(routes_of(rogue_monitor).await?, Some(0), "the rogue joined");

    // The same, with the password: it joins (the refusal was the password's).
    let with_password = format!(
        "nats://{}:{}@{node}",
        stack::infra::ROUTE_USER,
        cluster.route_password()
    );
    let (_member, monitor) = outsider(&with_password, &dir.join("member.log"))?;
    saga_tests::eventually("the server with the password to join", DEADLINE, || async {
        Ok(routes_of(monitor).await?.filter(|n| *n > 0))
    })
    .await?;
    assert_eq!(routes_of(rogue_monitor).await?, Some(0), "the rogue joined");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

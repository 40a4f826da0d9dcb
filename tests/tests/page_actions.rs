//! The saga page as an operator uses it, in headless Chromium driven
//! through WebDriver: signing in (and being refused), searching by order id
//! and by customer, watching sagas arrive live, reading the dead letters
//! with what redrives them, resolving a halted saga with a note, and
//! retrying or redriving through the operator console.

use anyhow::{Result, ensure};
use saga_tests::{
    ADMIN_TOKEN, DEADLINE, Stack, assert_refused, eventually,
    halted::{
        halted_refund, refunds_refused_stack, refunds_refused_stack_with_console, timeline_until,
    },
    webdriver::Browser,
};
use serde_json::Value;

/// What the page says it shows: `true` (a view), `signin`, `error`.
async fn ready(browser: &Browser, state: &str) -> Result<()> {
    browser
        .until(
            &format!("the page to be {state}"),
            &format!("return document.body.dataset.ready === {state:?};"),
        )
        .await
        .map(drop)
}

/// A browser on the page, signed in through the link's fragment.
async fn signed_in(stack: &Stack) -> Result<Browser> {
    let browser = Browser::start().await?;
    let url = format!("{}#token={ADMIN_TOKEN}", stack.url("order", "/ui"));
    browser.goto(&url).await?;
    ready(&browser, "true").await?;
    Ok(browser)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_is_refused_without_the_token_then_finds_and_resolves_a_halted_saga()
-> Result<()> {
    let stack = refunds_refused_stack().await?;
    let (id, _) = halted_refund(&stack).await?;
    let browser = Browser::start().await?;

    // Without the token: the sign-in form and no saga; a wrong token is refused.
    browser.goto(&stack.url("order", "/ui")).await?;
    ready(&browser, "signin").await?;
    let main = browser.text("main").await?;
    ensure!(main.contains("sign in with the operator token"), "{main}");
    ensure!(!main.contains(&id.to_string()), "shown signed out: {main}");
    browser
        .type_into("#signin input[name=token]", "not-the-token-at-all")
        .await?;
    browser.click("#signin button").await?;
    browser
        .until(
            "the wrong token to be refused",
            "return (document.getElementById('signin-why') || {}).textContent === 'wrong admin token';",
        )
        .await?;
    ensure!(!browser.text("main").await?.contains(&id.to_string()));

    // Signed in: the halted saga is listed.
    browser
        .type_into("#signin input[name=token]", ADMIN_TOKEN)
        .await?;
    browser.click("#signin button").await?;
    ready(&browser, "true").await?;
    browser
        .until(
            "the halted saga in the list",
            &format!("return document.querySelector('tr.saga[data-id=\"{id}\"]') !== null;"),
        )
        .await?;

    // Searching by customer lists alice's order; by its id opens the saga.
    browser.type_into("#search input[name=q]", "alice").await?;
    browser.click("#search button").await?;
    browser
        .until(
            "alice's orders",
            &format!(
                "return document.querySelector('#orders tr.order[data-id=\"{id}\"]') !== null;"
            ),
        )
        .await?;
    browser
        .type_into("#search input[name=q]", &id.to_string())
        .await?;
    browser.click("#search button").await?;
    let shown = browser
        .until(
            "the saga's summary",
            "const s = document.querySelector('#summary [data-status]'); return s && s.dataset.status;",
        )
        .await?;
    ensure!(shown == "REQUIRES_INTERVENTION", "{shown}");
    let timeline = browser.text("#timeline").await?;
    ensure!(timeline.contains("sagactl dlq redrive --seq"), "{timeline}");

    // An empty note is not sent: the form asks for it.
    browser
        .type_into("#resolve input[name=operator]", "ada")
        .await?;
    browser.click("#resolve button").await?;
    let missing = browser
        .eval("return document.querySelector('#resolve textarea').validity.valueMissing && document.getElementById('resolve-outcome').textContent === '';")
        .await?;
    ensure!(missing == Value::Bool(true), "sent without a note");
    browser
        .type_into(
            "#resolve textarea[name=note]",
            "refunded in the gateway console",
        )
        .await?;
    browser.click("#resolve button").await?;
    browser
        .until(
            "the page to show the saga resolved",
            "const s = document.querySelector('#summary [data-status]'); return s && s.dataset.status === 'MANUALLY_COMPENSATED';",
        )
        .await?;
    ensure!(stack.order(id).await?["status"] == "MANUALLY_COMPENSATED");
    let entries = timeline_until(&stack, id, "OrderManuallyCompensated").await?;
    let last = entries.last().expect("an entry");
    ensure!(
        last["reason"] == "refunded in the gateway console",
        "{last}"
    );
    ensure!(last["effect"] == "compensated by hand by ada", "{last}");
    eventually("the refund by hand to be recorded", DEADLINE, || async {
        Ok((stack.balance("alice").await? == 10_000).then_some(()))
    })
    .await?;

    // Signing out shows the sign-in form again.
    browser.click("#signout").await?;
    ready(&browser, "signin").await?;
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_view_lists_each_dead_letter_with_its_redrive_and_refuses_strangers()
-> Result<()> {
    let stack = refunds_refused_stack().await?;
    let (id, entries) = halted_refund(&stack).await?;
    let dead: Vec<&Value> = entries
        .iter()
        .filter(|e| e["kind"] == "dead_letter")
        .collect();
    ensure!(dead.len() == 1, "{entries:#?}");
    let seq = dead[0]["streamSeq"].as_i64().unwrap_or_default();
    // The dead letter stays in the saga's trace (the placement's request).
    let placed = &entries[0];
    ensure!(placed["eventType"] == "OrderPlaced", "{entries:#?}");
    ensure!(
        placed["traceId"].as_str().is_some_and(|t| t.len() == 32),
        "{placed}"
    );
    ensure!(dead[0]["traceId"] == placed["traceId"], "{entries:#?}");

    let (status, page) = stack.get_json("order", "/dead-letters").await?;
    ensure!(status == 200, "{status} {page}");
    let listed = &page["deadLetters"][0];
    ensure!(listed["correlationId"] == id.to_string(), "{page}");
    ensure!(listed["dlqSeq"] == seq, "{page}");
    ensure!(listed["service"] == "payment", "{page}");
    ensure!(listed["sagaStatus"] == "REQUIRES_INTERVENTION", "{page}");
    let (status, body) = stack.get_json("order", "/dead-letters?before=0").await?;
    assert_refused(status, &body, 400, "before must be positive");
    let (status, body) = stack.get_json("order", "/dead-letters?limit=501").await?;
    assert_refused(status, &body, 400, "limit must be between 1 and 500");
    let anonymous = reqwest::Client::new()
        .get(stack.url("order", "/dead-letters"))
        .send()
        .await?;
    ensure!(anonymous.status() == 401, "{}", anonymous.status());

    let browser = signed_in(&stack).await?;
    browser.click("#nav-dead-letters").await?;
    let row = format!("#dead-letters tr.dead-letter[data-seq=\"{seq}\"]");
    let text = browser
        .until(
            "the dead letter listed",
            &format!("const r = document.querySelector('{row}'); return r && r.textContent;"),
        )
        .await?;
    let text = text.as_str().unwrap_or_default();
    ensure!(text.contains(&id.to_string()), "{text}");
    ensure!(text.contains("InventoryReservationFailed"), "{text}");
    ensure!(
        text.contains(&format!("sagactl dlq redrive --seq {seq} --dry-run")),
        "{text}"
    );
    // Still halted, still charged: reading moves nothing (the invariants
    // hold again only once an operator resolves it, as above).
    ensure!(stack.order(id).await?["status"] == "REQUIRES_INTERVENTION");
    ensure!(stack.balance("alice").await? == 7_500);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_new_sagas_as_they_come_and_how_old_its_view_is() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let (first, _) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    let browser = signed_in(&stack).await?;
    browser
        .until(
            "the first saga listed",
            &format!("return document.querySelector('tr.saga[data-id=\"{first}\"]') !== null;"),
        )
        .await?;
    // A mark on this page load: gone if the page were loaded again.
    browser.eval("window.sameLoad = true; return null;").await?;
    let (second, _) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    browser
        .until(
            "the second saga to appear without a reload",
            &format!(
                "return window.sameLoad === true && document.querySelector('tr.saga[data-id=\"{second}\"]') !== null;"
            ),
        )
        .await?;
    let age = browser.text("#updated").await?;
    ensure!(
        age.starts_with("updated ") && age.ends_with(" s ago"),
        "{age}"
    );
    // Live off: the view stays as it is and its age grows past a refresh.
    browser.click("#live").await?;
    let aged = browser
        .until(
            "the view's age to pass two refreshes",
            "return Number(document.getElementById('updated').dataset.age) >= 5;",
        )
        .await;
    ensure!(aged.is_ok(), "{aged:?}");
    stack.assert_invariants().await
}

/// With the operator console beside the stack, a halted saga is dry-run
/// from its page, its dead letter redriven from the dead-letter view once
/// the gateway is back, and the saga ends with exactly one refund; the
/// action is not offered twice, and the console, asked again, finds
/// nothing left to redrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_dry_runs_a_retry_then_redrives_the_dead_letter_from_the_page() -> Result<()> {
    let (stack, console) = refunds_refused_stack_with_console().await?;
    let (id, entries) = halted_refund(&stack).await?;
    let seq = entries
        .iter()
        .find(|e| e["kind"] == "dead_letter")
        .and_then(|e| e["streamSeq"].as_i64())
        .expect("a dead letter");
    let browser = signed_in(&stack).await?;

    // The saga's page offers a retry; its dry run says what would go out
    // and moves nothing.
    browser
        .goto(&stack.url("order", &format!("/ui?saga={id}")))
        .await?;
    ready(&browser, "true").await?;
    let offered = browser
        .eval("return document.querySelector('#retry button.act').disabled;")
        .await?;
    ensure!(
        offered == Value::Bool(true),
        "retry offered before a dry run"
    );
    browser.click("#retry button.dry-run").await?;
    let said = browser
        .until(
            "the retry's dry run",
            "const f = document.getElementById('retry'); return f.dataset.outcome === 'dry-run' && f.querySelector('.outcome').textContent;",
        )
        .await?;
    let said = said.as_str().unwrap_or_default();
    ensure!(
        said.starts_with(&format!("would redrive {seq}: InventoryReservationFailed")),
        "{said}"
    );
    let offered = browser
        .eval("return document.querySelector('#retry button.act').disabled;")
        .await?;
    ensure!(offered == Value::Bool(false), "no retry after the dry run");
    ensure!(stack.balance("alice").await? == 7_500);
    ensure!(stack.order(id).await?["status"] == "REQUIRES_INTERVENTION");

    // The gateway is back; the dead letter is redriven from its row.
    let (status, rules) = stack
        .put("payment", "/admin/gateway", serde_json::json!({}))
        .await?;
    ensure!(status == 200, "{rules}");
    browser.click("#nav-dead-letters").await?;
    ready(&browser, "true").await?;
    let form = format!("#redrive-{seq}");
    browser.click(&format!("{form} button.dry-run")).await?;
    browser
        .until(
            "the redrive's dry run",
            &format!(
                "return document.querySelector('{form}').dataset.outcome === 'dry-run' && document.querySelector('{form} li[data-outcome=\"would redrive\"]') !== null;"
            ),
        )
        .await?;
    // Without a note the form asks for one and sends nothing.
    browser
        .type_into(&format!("{form} input[name=operator]"), "ada")
        .await?;
    browser.click(&format!("{form} button.act")).await?;
    let missing = browser
        .eval(&format!(
            "return document.querySelector('{form} textarea').validity.valueMissing && document.querySelector('{form}').dataset.outcome === 'dry-run';"
        ))
        .await?;
    ensure!(missing == Value::Bool(true), "sent without a note");
    browser
        .type_into(&format!("{form} textarea[name=note]"), "gateway back")
        .await?;
    browser.click(&format!("{form} button.act")).await?;
    let done = browser
        .until(
            "the redrive",
            &format!(
                "const f = document.querySelector('{form}'); return f.dataset.outcome === 'done' && f.querySelector('.outcome').textContent;"
            ),
        )
        .await?;
    let done = done.as_str().unwrap_or_default();
    ensure!(done.starts_with(&format!("redrove {seq}:")), "{done}");
    let again = browser
        .eval(&format!(
            "return document.querySelector('{form} button.act').disabled;"
        ))
        .await?;
    ensure!(again == Value::Bool(true), "the redrive is offered twice");

    // The saga ends as it would have, with one refund, the redrive on record.
    let entries = timeline_until(&stack, id, "OrderCancelled").await?;
    let refunds = entries
        .iter()
        .filter(|e| e["eventType"] == "PaymentRefunded")
        .count();
    ensure!(refunds == 1, "{entries:#?}");
    let by_ada = entries
        .iter()
        .any(|e| e["kind"] == "operator" && e["reason"] == "gateway back");
    ensure!(by_ada, "{entries:#?}");
    browser
        .goto(&stack.url("order", &format!("/ui?saga={id}")))
        .await?;
    browser
        .until(
            "the page to show the saga cancelled",
            "const s = document.querySelector('#summary [data-status]'); return s && s.dataset.status === 'CANCELLED' && document.getElementById('retry') === null;",
        )
        .await?;

    // Asked again, the console has nothing left to redrive.
    let again = stack
        .http
        .post(console.url(&format!("/sagas/{id}/retry")))
        .json(&serde_json::json!({ "operator": "ada", "note": "once more" }))
        .send()
        .await?;
    ensure!(again.status() == 404, "{}", again.status());
    stack.settle().await?;
    ensure!(stack.balance("alice").await? == 10_000);
    stack.assert_invariants().await
}

//! Sample-event producer for `scripts/demo`: one `order.created` and one `payment.captured` (alternating
//! tenants acme/globex) per interval, forever.
//!
//!   cargo run --example demo_producer -- BOOTSTRAP [INTERVAL_MS]
//!   cargo run --example demo_producer -- --create-topics BOOTSTRAP   (orders and payments, 4 partitions each)

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

/// Creates the demo's topics; one that exists already is fine.
async fn create_topics(bootstrap: &str) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| e.to_string())?;
    let topics: Vec<NewTopic> = ["orders", "payments"]
        .iter()
        .map(|t| NewTopic::new(t, 4, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .create_topics(&topics, &opts)
        .await
        .map_err(|e| e.to_string())?
    {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(format!("{t}: {e}")),
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "--create-topics") {
        let bootstrap = args.nth(1).unwrap_or_default();
        if let Err(e) = create_topics(&bootstrap).await {
            eprintln!("demo_producer: creating topics: {e}");
            std::process::exit(1);
        }
        return;
    }
    let Some(bootstrap) = args.next() else {
        eprintln!("usage: demo_producer BOOTSTRAP [INTERVAL_MS] | --create-topics BOOTSTRAP");
        std::process::exit(2);
    };
    let interval = Duration::from_millis(args.next().and_then(|a| a.parse().ok()).unwrap_or(1000));
    let producer: FutureProducer = match ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("demo_producer: {e}");
            std::process::exit(1);
        }
    };
    for i in 1u64.. {
        let tenant = if i % 2 == 0 { "acme" } else { "globex" };
        let order = format!(
            r#"{{"id":"ord-{i:05}","type":"order.created","data":{{"amount":{}}}}}"#,
            i * 7 % 500
        );
        let payment = format!(
            r#"{{"id":"pay-{i:05}","type":"payment.captured","tenant":"{tenant}","data":{{}}}}"#
        );
        for (topic, value) in [("orders", &order), ("payments", &payment)] {
            let key = i.to_string();
            if let Err((e, _)) = producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(value),
                    Duration::from_secs(5),
                )
                .await
            {
                eprintln!("demo_producer: {topic}: {e}");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

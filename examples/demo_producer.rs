//! Sample-event producer for `scripts/demo`: one `order.created` and one `payment.captured` (alternating
//! tenants acme/globex) per interval, forever.
//!
//!   cargo run --example demo_producer -- BOOTSTRAP [INTERVAL_MS]

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let Some(bootstrap) = args.next() else {
        eprintln!("usage: demo_producer BOOTSTRAP [INTERVAL_MS]");
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

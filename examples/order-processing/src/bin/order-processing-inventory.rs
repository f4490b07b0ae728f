//! Inventory: reserves stock for every `OrderPlaced`. The reservation is simulated I/O
//! (`INVENTORY_WORK_MS`, default 5 ms per order) through a pool of
//! `INVENTORY_CONNECTIONS` (default 4) connections to the stock service per replica, so
//! one replica handles at most connections / work orders a second, a traffic spike builds
//! lag, and more replicas drain it faster.

use std::time::Duration;

use eventops_consumer_runtime::{Context, Event, Handler, HandlerError, Worker};
use eventops_example_order_processing::{ORDER_PLACED, OrderPlaced, env_millis, init_logging};

struct Inventory {
    work: Duration,
    connections: tokio::sync::Semaphore,
}

impl Handler for Inventory {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        if event.event_type() != ORDER_PLACED {
            return Err(HandlerError::message(
                eventops_consumer_runtime::ErrorKind::Permanent,
                format!(
                    "inventory handles {ORDER_PLACED}, not {}",
                    event.event_type()
                ),
            ));
        }
        let order: OrderPlaced = event.data()?;
        {
            let _connection = self
                .connections
                .acquire()
                .await
                .map_err(HandlerError::transient)?;
            tokio::time::sleep(self.work).await;
        }
        let units: u32 = order.items.iter().map(|l| l.quantity).sum();
        tracing::debug!(order_id = %order.order_id, units, "stock reserved");
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let work = env_millis("INVENTORY_WORK_MS", 5)?;
    let connections = match std::env::var("INVENTORY_CONNECTIONS") {
        Ok(v) => v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            anyhow::anyhow!("INVENTORY_CONNECTIONS is {v:?}; expected a whole number above 0")
        })?,
        Err(_) => 4,
    };
    Worker::from_env()?
        .build(Inventory {
            work,
            connections: tokio::sync::Semaphore::new(connections),
        })
        .await?
        .run()
        .await?;
    Ok(())
}

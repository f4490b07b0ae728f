//! Notification: tells the customer about every `OrderPlaced` (order confirmation) and
//! every `PaymentCaptured` (receipt). Sending is simulated (`NOTIFICATION_WORK_MS`,
//! default 1 ms).

use std::time::Duration;

use eventops_consumer_runtime::{Context, ErrorKind, Event, Handler, HandlerError, Worker};
use eventops_example_order_processing::{
    ORDER_PLACED, OrderPlaced, PAYMENT_CAPTURED, PaymentCaptured, env_millis, init_logging,
};

struct Notification {
    work: Duration,
}

impl Handler for Notification {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        let (order_id, what) = match event.event_type() {
            ORDER_PLACED => (event.data::<OrderPlaced>()?.order_id, "order confirmation"),
            PAYMENT_CAPTURED => (event.data::<PaymentCaptured>()?.order_id, "payment receipt"),
            other => {
                return Err(HandlerError::message(
                    ErrorKind::Permanent,
                    format!(
                        "notification handles {ORDER_PLACED} and {PAYMENT_CAPTURED}, not {other}"
                    ),
                ));
            }
        };
        tokio::time::sleep(self.work).await;
        tracing::debug!(%order_id, what, "notification sent");
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let work = env_millis("NOTIFICATION_WORK_MS", 1)?;
    Worker::from_env()?
        .build(Notification { work })
        .await?
        .run()
        .await?;
    Ok(())
}

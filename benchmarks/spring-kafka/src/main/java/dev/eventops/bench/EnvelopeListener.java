package dev.eventops.bench;

import java.util.Queue;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.LongAdder;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.springframework.kafka.annotation.KafkaListener;
import org.springframework.kafka.support.Acknowledgment;
import org.springframework.stereotype.Component;
import tools.jackson.databind.json.JsonMapper;

/**
 * Per record: parse the JSON envelope, skip it if its event id was seen recently (a
 * bounded in-memory set shared by all listener threads, like the runtime's Memory
 * idempotency), acknowledge it. The container commits acknowledged offsets after each
 * poll's records (AckMode.MANUAL). With listener concurrency above 1 several threads call
 * {@link #onRecord}, so its state is concurrent.
 */
@Component
public class EnvelopeListener {

    /** Same bound as the Rust contenders' idempotency set. */
    static final int SEEN_CAPACITY = 100_000;

    /** Spring Boot 4's auto-configured Jackson 3 mapper. */
    private final JsonMapper mapper;
    private final Set<String> seen = ConcurrentHashMap.newKeySet();
    /** Insertion order of {@link #seen}, to evict the oldest id. */
    private final Queue<String> order = new ConcurrentLinkedQueue<>();
    private final AtomicInteger size = new AtomicInteger();
    private final AtomicBoolean first = new AtomicBoolean(true);
    private final LongAdder processed = new LongAdder();
    private final LongAdder duplicates = new LongAdder();

    public EnvelopeListener(JsonMapper mapper) {
        this.mapper = mapper;
    }

    @KafkaListener(topics = "${BENCH_TOPIC}")
    public void onRecord(ConsumerRecord<byte[], byte[]> record, Acknowledgment ack) {
        if (first.compareAndSet(true, false)) {
            // The harness times from this line to the moment all offsets are committed.
            System.out.println("FIRST_RECORD_AT_MS " + System.currentTimeMillis());
            System.out.flush();
        }
        Envelope envelope = mapper.readValue(record.value(), Envelope.class);
        if (seen.add(envelope.id())) {
            order.add(envelope.id());
            if (size.incrementAndGet() > SEEN_CAPACITY) {
                String oldest = order.poll();
                if (oldest != null) {
                    seen.remove(oldest);
                    size.decrementAndGet();
                }
            }
            processed.increment();
        } else {
            duplicates.increment();
        }
        ack.acknowledge();
    }
}

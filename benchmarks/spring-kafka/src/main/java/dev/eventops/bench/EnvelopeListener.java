package dev.eventops.bench;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.util.LinkedHashSet;
import java.util.Iterator;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.springframework.kafka.annotation.KafkaListener;
import org.springframework.kafka.support.Acknowledgment;
import org.springframework.stereotype.Component;

/**
 * Per record: parse the JSON envelope, skip it if its event id was seen recently (a
 * bounded in-memory set, like the runtime's Memory idempotency), acknowledge it. The
 * container commits acknowledged offsets after each poll's records (AckMode.MANUAL).
 */
@Component
public class EnvelopeListener {

    /** Same bound as the Rust contenders' idempotency set. */
    static final int SEEN_CAPACITY = 100_000;

    private final ObjectMapper mapper;
    private final LinkedHashSet<String> seen = new LinkedHashSet<>();
    private boolean first = true;
    private long processed;
    private long duplicates;

    public EnvelopeListener(ObjectMapper mapper) {
        this.mapper = mapper;
    }

    @KafkaListener(topics = "${BENCH_TOPIC}")
    public void onRecord(ConsumerRecord<byte[], byte[]> record, Acknowledgment ack) throws IOException {
        if (first) {
            first = false;
            // The harness times from this line to the moment all offsets are committed.
            System.out.println("FIRST_RECORD_AT_MS " + System.currentTimeMillis());
            System.out.flush();
        }
        Envelope envelope = mapper.readValue(record.value(), Envelope.class);
        if (seen.add(envelope.id())) {
            if (seen.size() > SEEN_CAPACITY) {
                Iterator<String> oldest = seen.iterator();
                oldest.next();
                oldest.remove();
            }
            processed++;
        } else {
            duplicates++;
        }
        ack.acknowledge();
    }
}

package dev.eventops.bench;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.context.annotation.Bean;
import org.springframework.kafka.listener.DefaultErrorHandler;
import org.springframework.util.backoff.FixedBackOff;

/** Spring Boot entry point; the listener is {@link EnvelopeListener}. */
@SpringBootApplication
public class BenchApplication {

    public static void main(String[] args) {
        SpringApplication.run(BenchApplication.class, args);
    }

    /**
     * The error handler Spring Kafka users configure: retry a failed record in place, then
     * log and skip it. Spring Boot wires this bean into the listener container factory.
     */
    @Bean
    DefaultErrorHandler errorHandler() {
        return new DefaultErrorHandler(new FixedBackOff(200L, 2L));
    }
}

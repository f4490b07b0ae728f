package dev.eventops.bench;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import java.util.List;

/** The event envelope as every contender decodes it, data included. */
@JsonIgnoreProperties(ignoreUnknown = true)
public record Envelope(
        String id,
        String type,
        int schemaVersion,
        String correlationId,
        String timestamp,
        OrderPlaced data) {

    /** The benchmark's event data. */
    @JsonIgnoreProperties(ignoreUnknown = true)
    public record OrderPlaced(String orderId, String customerId, List<OrderLine> items, String note) {
    }

    /** One line of an order. */
    @JsonIgnoreProperties(ignoreUnknown = true)
    public record OrderLine(String sku, int quantity, long priceCents) {
    }
}

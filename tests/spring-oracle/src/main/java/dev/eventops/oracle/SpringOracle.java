package dev.eventops.oracle;

import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

import org.springframework.kafka.core.DefaultKafkaConsumerFactory;
import org.springframework.kafka.core.DefaultKafkaProducerFactory;
import org.springframework.kafka.core.KafkaTemplate;
import org.springframework.kafka.listener.ConsumerAwareRecordRecoverer;
import org.springframework.kafka.listener.ContainerProperties;
import org.springframework.kafka.listener.DeadLetterPublishingRecoverer;
import org.springframework.kafka.listener.DefaultErrorHandler;
import org.springframework.kafka.listener.KafkaMessageListenerContainer;
import org.springframework.kafka.listener.MessageListener;
import org.springframework.kafka.support.TopicPartitionOffset;
import org.springframework.util.backoff.FixedBackOff;

/**
 * What a Spring Kafka service writes, produced by Spring's own classes, for the EventOps
 * interoperability tests to compare with the consumer runtime's records.
 *
 * <pre>
 * dead-letter --bootstrap B --mechanism M --user U --password P --group G
 *             --topic T --partition N --offset O --dlt D --exception FQCN --message TEXT
 *             [--count C]
 * </pre>
 *
 * Runs a listener container of group G on T-N from offset O whose listener throws
 * {@code new FQCN(TEXT)} for that record (and the C - 1 after it, C defaulting to 1), with a {@link DefaultErrorHandler} (no retries)
 * and a {@link DeadLetterPublishingRecoverer} sending to D, the source partition number
 * (as a service configured with {@code (r, e) -> new TopicPartition(D, r.partition())}).
 * Exits 0 once the recoverer has published them all, 1 otherwise.
 *
 * <pre>
 * retry-main  (login options) --group G --topic T --message TEXT
 * retry-rest  (login options) --group G --topic T --message TEXT
 * </pre>
 *
 * A Spring service with {@code @RetryableTopic(attempts = "2", backOff = @BackOff(1000))}
 * on T: Spring's retry topic {@code T-retry} and dead-letter topic {@code T-dlt} (created by
 * the caller), groups G, {@code G-retry} and {@code G-dlt}; its listener always throws
 * {@code IllegalStateException(TEXT)}. {@code retry-main} runs only the main topic's
 * listener and exits once Spring has sent the failed record on to {@code T-retry};
 * {@code retry-rest} runs the retry topic's and the dead-letter topic's listeners and exits
 * once the {@code @DltHandler} got a record. Each received record is printed as
 * {@code RECEIVED <topic> <partition> <offset> attempts=<retry_topic-attempts>}.
 */
public final class SpringOracle {

	private SpringOracle() {
	}

	public static void main(String[] args) throws Exception {
		if (args.length == 0) {
			usage("no mode given");
		}
		Map<String, String> a = options(args);
		switch (args[0]) {
			case "dead-letter" -> deadLetter(a);
			case "retry-main" -> RetryService.run(a, RetryService.ID);
			case "retry-rest" -> RetryService.run(a, RetryService.ID + "-retry", RetryService.ID + "-dlt");
			default -> usage("unknown mode " + args[0]);
		}
	}

	private static void deadLetter(Map<String, String> a) throws Exception {
		String topic = need(a, "topic");
		int partition = Integer.parseInt(need(a, "partition"));
		long offset = Long.parseLong(need(a, "offset"));
		String dlt = need(a, "dlt");
		String exceptionClass = need(a, "exception");
		String message = need(a, "message");
		int count = Integer.parseInt(a.getOrDefault("count", "1"));

		KafkaTemplate<byte[], byte[]> template = template(a);
		DeadLetterPublishingRecoverer dlpr = new DeadLetterPublishingRecoverer(template,
				(r, e) -> new TopicPartition(dlt, r.partition()));
		CountDownLatch published = new CountDownLatch(count);
		ConsumerAwareRecordRecoverer recoverer = (r, consumer, e) -> {
			dlpr.accept(r, consumer, e);
			published.countDown();
		};
		DefaultErrorHandler errors = new DefaultErrorHandler(recoverer, new FixedBackOff(0L, 0L));

		ContainerProperties props = new ContainerProperties(new TopicPartitionOffset(topic, partition, offset));
		props.setGroupId(need(a, "group"));
		props.setMessageListener((MessageListener<byte[], byte[]>) r -> {
			if (r.offset() >= offset && r.offset() < offset + count) {
				throw exception(exceptionClass, message);
			}
		});
		KafkaMessageListenerContainer<byte[], byte[]> container =
				new KafkaMessageListenerContainer<>(new DefaultKafkaConsumerFactory<>(consumerProps(a)), props);
		container.setCommonErrorHandler(errors);
		container.start();
		boolean done = published.await(60, TimeUnit.SECONDS);
		container.stop();
		template.destroy();
		if (!done) {
			System.err.println("spring-oracle: " + published.getCount() + " of " + count
					+ " records were not dead-lettered within 60 s");
			System.exit(1);
		}
		System.out.println("spring-oracle: dead-lettered " + count + " from " + topic + "-" + partition + "@" + offset + " to " + dlt);
		System.exit(0);
	}

	private static RuntimeException exception(String className, String message) {
		try {
			return (RuntimeException) Class.forName(className).getConstructor(String.class).newInstance(message);
		}
		catch (ReflectiveOperationException | ClassCastException e) {
			throw new IllegalArgumentException("--exception " + className
					+ ": expected a RuntimeException class with a (String) constructor", e);
		}
	}

	static KafkaTemplate<byte[], byte[]> template(Map<String, String> a) {
		Map<String, Object> p = clientProps(a);
		p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class);
		p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class);
		return new KafkaTemplate<>(new DefaultKafkaProducerFactory<>(p));
	}

	static Map<String, Object> consumerProps(Map<String, String> a) {
		Map<String, Object> p = clientProps(a);
		p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
		p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
		p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
		return p;
	}

	private static Map<String, Object> clientProps(Map<String, String> a) {
		Map<String, Object> p = new HashMap<>();
		p.put("bootstrap.servers", need(a, "bootstrap"));
		p.put("security.protocol", "SASL_PLAINTEXT");
		p.put("sasl.mechanism", need(a, "mechanism"));
		p.put("sasl.jaas.config", "org.apache.kafka.common.security.scram.ScramLoginModule required username=\""
				+ need(a, "user") + "\" password=\"" + need(a, "password") + "\";");
		return p;
	}

	private static Map<String, String> options(String[] args) {
		Map<String, String> out = new HashMap<>();
		for (int i = 1; i < args.length; i += 2) {
			if (!args[i].startsWith("--") || i + 1 >= args.length) {
				usage("expected --name value pairs, got " + args[i]);
			}
			out.put(args[i].substring(2), args[i + 1]);
		}
		return out;
	}

	static String need(Map<String, String> a, String name) {
		String v = a.get(name);
		if (v == null) {
			usage("--" + name + " is missing");
		}
		return v;
	}

	private static void usage(String problem) {
		System.err.println("spring-oracle: " + problem + "; see the class comment of SpringOracle for the modes");
		System.exit(2);
	}
}

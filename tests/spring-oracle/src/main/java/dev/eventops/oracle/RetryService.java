package dev.eventops.oracle;

import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.header.Header;

import org.springframework.context.annotation.AnnotationConfigApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.kafka.annotation.BackOff;
import org.springframework.kafka.annotation.DltHandler;
import org.springframework.kafka.annotation.EnableKafka;
import org.springframework.kafka.annotation.EnableKafkaRetryTopic;
import org.springframework.kafka.annotation.KafkaListener;
import org.springframework.kafka.annotation.RetryableTopic;
import org.springframework.kafka.config.ConcurrentKafkaListenerContainerFactory;
import org.springframework.kafka.config.KafkaListenerEndpointRegistry;
import org.springframework.kafka.core.DefaultKafkaConsumerFactory;
import org.springframework.kafka.core.KafkaTemplate;
import org.springframework.kafka.retrytopic.RetryTopicHeaders;
import org.springframework.kafka.support.ProducerListener;
import org.springframework.scheduling.TaskScheduler;
import org.springframework.scheduling.concurrent.ThreadPoolTaskScheduler;

/**
 * A Spring service using {@code @RetryableTopic} as documented, configured from system
 * properties ({@code oracle.*}) that {@link #run} sets. See {@link SpringOracle}.
 */
@Configuration
@EnableKafka
@EnableKafkaRetryTopic
public class RetryService {

	static final String ID = "oracle";

	/** Counted down when the running listeners reached their goal. */
	static final CountDownLatch DONE = new CountDownLatch(1);

	static volatile boolean waitForRetryTopic;

	static Map<String, String> options;

	static void run(Map<String, String> a, String... containers) throws Exception {
		options = a;
		String topic = SpringOracle.need(a, "topic");
		System.setProperty("oracle.topic", topic);
		System.setProperty("oracle.group", SpringOracle.need(a, "group"));
		System.setProperty("oracle.message", SpringOracle.need(a, "message"));
		waitForRetryTopic = containers.length == 1;
		try (AnnotationConfigApplicationContext ctx = new AnnotationConfigApplicationContext(RetryService.class)) {
			KafkaListenerEndpointRegistry registry = ctx.getBean(KafkaListenerEndpointRegistry.class);
			for (String id : containers) {
				registry.getListenerContainer(id).start();
			}
			boolean done = DONE.await(90, TimeUnit.SECONDS);
			registry.stop();
			if (!done) {
				System.err.println("spring-oracle: the retry chain did not get there within 90 s");
				System.exit(1);
			}
		}
		System.exit(0);
	}

	@Bean
	KafkaTemplate<byte[], byte[]> kafkaTemplate() {
		KafkaTemplate<byte[], byte[]> template = SpringOracle.template(options);
		String retryTopic = SpringOracle.need(options, "topic") + "-retry";
		template.setProducerListener(new ProducerListener<>() {
			@Override
			public void onSuccess(ProducerRecord<byte[], byte[]> record, RecordMetadata metadata) {
				System.out.println("SENT " + record.topic() + " " + metadata.partition() + " " + metadata.offset());
				if (waitForRetryTopic && record.topic().equals(retryTopic)) {
					DONE.countDown();
				}
			}
		});
		return template;
	}

	@Bean
	ConcurrentKafkaListenerContainerFactory<byte[], byte[]> kafkaListenerContainerFactory() {
		Map<String, Object> props = SpringOracle.consumerProps(options);
		props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
		ConcurrentKafkaListenerContainerFactory<byte[], byte[]> factory = new ConcurrentKafkaListenerContainerFactory<>();
		factory.setConsumerFactory(new DefaultKafkaConsumerFactory<>(props));
		return factory;
	}

	@Bean
	TaskScheduler taskScheduler() {
		return new ThreadPoolTaskScheduler();
	}

	@Bean
	Listener listener() {
		return new Listener();
	}

	/** The service's listener. */
	public static class Listener {

		@RetryableTopic(attempts = "2", backOff = @BackOff(delay = 1000), autoCreateTopics = "false")
		@KafkaListener(id = ID, topics = "${oracle.topic}", groupId = "${oracle.group}", autoStartup = "false")
		public void listen(ConsumerRecord<byte[], byte[]> record) {
			print("RECEIVED", record);
			throw new IllegalStateException(System.getProperty("oracle.message"));
		}

		@DltHandler
		public void dlt(ConsumerRecord<byte[], byte[]> record) {
			print("DLT", record);
			DONE.countDown();
		}

		private static void print(String what, ConsumerRecord<byte[], byte[]> record) {
			Header attempts = record.headers().lastHeader(RetryTopicHeaders.DEFAULT_HEADER_ATTEMPTS);
			Header due = record.headers().lastHeader(RetryTopicHeaders.DEFAULT_HEADER_BACKOFF_TIMESTAMP);
			System.out.println(what + " " + record.topic() + " " + record.partition() + " " + record.offset()
					+ " attempts=" + (attempts == null ? "none" : ByteBuffer.wrap(attempts.value()).getInt())
					+ " due=" + (due == null ? "none" : new BigInteger(due.value()).longValue())
					+ " at=" + System.currentTimeMillis());
			System.out.flush();
		}
	}
}

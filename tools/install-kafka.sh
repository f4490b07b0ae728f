#!/usr/bin/env bash
# Fetches Apache Kafka (broker, KRaft controller and its command-line tools) from Maven
# Central into the cache. Prints the lib directory.
source "$(dirname "$0")/lib.sh"

dest="$EVENTOPS_CACHE/kafka-$KAFKA_VERSION-log4j-$LOG4J_VERSION-slf4j-$SLF4J_VERSION"
if [[ -f "$dest/.complete" ]]; then echo "$dest/lib"; exit 0; fi

need java "install a JDK 17+ (Debian: apt-get install openjdk-17-jdk-headless)"
need mvn "install Maven (Debian: apt-get install maven)"
log "fetching Kafka $KAFKA_VERSION and log4j $LOG4J_VERSION with Maven (first time only; took 5-15 s in our cold runs)"
rm -rf "$dest" && mkdir -p "$dest/pom"
cat > "$dest/pom/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.eventops</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <!-- Kafka pulls slf4j 1.7 in transitively; log4j-slf4j2-impl binds only to slf4j 2. -->
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>$SLF4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
timed "kafka fetch" mvn -B -q -f "$dest/pom/pom.xml" dependency:copy-dependencies \
  -DoutputDirectory="$dest/lib" -DincludeScope=runtime
ls "$dest/lib"/kafka_2.13-*.jar >/dev/null 2>&1 || die "Kafka jars missing in $dest/lib after the Maven fetch"
touch "$dest/.complete"
echo "$dest/lib"

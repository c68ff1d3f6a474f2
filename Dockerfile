# Builds the picket binary and runs it (used by docker-compose.yml).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin picket

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/picket picket && mkdir -p /var/lib/picket && chown picket /var/lib/picket
COPY --from=build /src/target/release/picket /usr/local/bin/picket
USER picket
WORKDIR /var/lib/picket
EXPOSE 50051
ENTRYPOINT ["picket"]
CMD ["serve", "--listen", "0.0.0.0:50051"]

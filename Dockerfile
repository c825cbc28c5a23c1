# The tidegate image: one static-enough binary on a distroless base, running as non-root.
# Build: docker build -t tidegate:dev .
FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tidegate

# glibc, libgcc and CA certificates (for Lua cosockets' sslhandshake), nothing else: no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tidegate /usr/local/bin/tidegate
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tidegate"]

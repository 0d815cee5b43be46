# One image for every role: `imagefork worker planner|resize|join`.
# The base is a build argument, so an air-gapped host can build on a locally made Python image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY schemas ./schemas
COPY streams ./streams
# a regular (wheel) install, every dependency at its pinned version (constraints.txt): the package, its schemas and its assets, nothing read from /app afterwards
RUN pip install --no-cache-dir -c constraints.txt . && rm -rf /app/streams /app/schemas
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["imagefork"]
CMD ["worker", "all"]

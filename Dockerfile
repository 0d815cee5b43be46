# One image for every role: `imagefork worker planner|resize|join`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY streams ./streams
RUN pip install --no-cache-dir -e .
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["imagefork"]
CMD ["worker", "all"]

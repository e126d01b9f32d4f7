# The platform's processes (API, bridge, migrations, CLI) for compose.yaml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lms_core lms_core
COPY bridge bridge
COPY api api
COPY firmware firmware
COPY lms_cli lms_cli
COPY migrations migrations
COPY mosquitto mosquitto
# Editable: the migration runner reads migrations/ next to the code.
RUN pip install --no-cache-dir -e .
USER nobody
ENTRYPOINT ["lms"]

# One image for every maskq process (web, worker, beat, Flower); docker-compose.yml picks the command.
FROM python:3.11-slim

WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# MASKQ_DEVICE=cuda (docker compose build --build-arg MASKQ_DEVICE=cuda) puts onnxruntime-gpu in the image;
# the CUDA libraries come from its nvidia-* dependencies, the driver from the host (NVIDIA Container Toolkit).
ARG MASKQ_DEVICE=cpu
COPY requirements.txt ./
COPY tools/onnxruntime_build.py ./tools/onnxruntime_build.py
RUN pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps rapidocr-onnxruntime==1.4.4 \
 && MASKQ_DEVICE=$MASKQ_DEVICE python -m tools.onnxruntime_build install 1.31.1
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# Not root: Celery warns against it, and nothing here needs it. A fixed number (the one useradd gave
# before, so volumes made by earlier images stay writable), for Kubernetes' runAsNonRoot and runAsUser.
RUN useradd --uid 1000 --user-group --create-home maskq && mkdir -p /data && chown maskq:maskq /data
USER 1000:1000
ENV MASKQ_DATA_DIR=/data
EXPOSE 8000
CMD ["gunicorn", "-c", "webapp/gunicorn_conf.py", "webapp.app:create_app()"]

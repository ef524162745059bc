"""`python -m services.threads`: serve chat.v1.ThreadsService until SIGTERM/SIGINT."""

from services.common.server import run_service
from services.threads.service import DEFINITION

raise SystemExit(run_service(DEFINITION))

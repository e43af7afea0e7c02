"""The ingress's FastAPI app: its generation routes are in ingress.py, its others in
service_routes.py, its middleware and error handlers in ingress.py."""
from fastapi import FastAPI

api = FastAPI(title="aptray")

"""The page, the view that starts a job, and the one that reports on it."""

from celery.result import AsyncResult
from django.http import HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .page import PAGE
from .tasks import count


def index(request):
    return HttpResponse(PAGE)


@csrf_exempt
def start(request):
    """POST: start a job of ``steps`` steps; answers its id."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    try:
        steps = max(1, min(100, int(request.POST.get("steps", "10"))))
    except ValueError:
        return JsonResponse({"error": "steps must be a number"}, status=400)
    job = count.delay(steps)
    return JsonResponse({"id": job.id, "steps": steps}, status=202)


def result(request, job_id):
    """A job's state, and its result once it has one."""
    found = AsyncResult(job_id)
    body = {"id": job_id, "state": found.state}
    if found.successful():
        body["result"] = found.result
    return JsonResponse(body)

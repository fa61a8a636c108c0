"""The management API under /admin/, enabled by --admin-key: list, load and unload models, and switch a
name's default version (as Triton's repository API and TorchServe's management API do)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from .auth import bearer_key_check
from .errors import APIError, bad_request
from .model_spec import MODEL_SETTINGS, ModelSpec
from .models import ModelRegistry, ServedModel
from .protocol import ERROR_RESPONSES


class LoadModel(BaseModel):
    """POST /admin/models: NAME or NAME:VERSION, the checkpoint's path, and the model's own engine settings."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is a 400, not silently the server's
    model: str = Field(min_length=1)
    path: str = Field(min_length=1)
    dtype: str | None = None
    quantization: str | None = None
    load_format: str | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    kv_cache_memory: int | None = None
    block_size: int | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool | None = None
    num_threads: int | None = None
    seed: int | None = None
    device: str | None = None
    tensor_parallel_size: int | None = None


class SetDefault(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None  # null: the version-less model of that name


class LoadLoRAAdapter(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body (base_model_name: ours, the model whose engine runs it)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    base_model_name: str | None = None


class UnloadLoRAAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; the name is enough here


class AdminModel(BaseModel):
    id: str
    name: str
    version: str | None
    path: str
    state: str  # loading | serving | draining | failed
    default: bool
    memory_bytes: int  # resident memory of its engine process (the estimate where it has none)
    budget_bytes: int  # what it counts against --memory-budget
    requests_in_flight: int
    engine_pid: int | None
    on_demand: bool  # loaded from --model-dir when first asked for
    base_model: str | None  # a LoRA adapter's base model


class AdminModelList(BaseModel):
    data: list[AdminModel]


assert set(LoadModel.model_fields) == {"model", "path", *MODEL_SETTINGS}


def _entry(models: ModelRegistry, m: ServedModel) -> AdminModel:
    return AdminModel(id=m.id, name=m.name, version=m.version, path=m.path, state=m.state,
                      default=models.is_default(m), memory_bytes=m.memory_bytes, budget_bytes=m.budget_bytes,
                      requests_in_flight=m.in_flight, engine_pid=m.engine_pid, on_demand=m.on_demand,
                      base_model=m.base.id if m.base else None)


def admin_router(models: ModelRegistry, admin_key: str, route_class: type[APIRoute] = APIRoute) -> APIRouter:
    """/admin/models..., and vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, all behind the admin key."""
    router = APIRouter(dependencies=[Depends(bearer_key_check(admin_key, "admin key"))],
                       route_class=route_class, responses=ERROR_RESPONSES, tags=["admin"])

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(req: LoadLoRAAdapter) -> str:
        await models.add_lora(req.lora_name, req.lora_path, req.base_model_name)
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(req: UnloadLoRAAdapter) -> str:
        served = models.models.get(req.lora_name)
        if served is None or served.base is None:
            raise APIError(404, f"no LoRA adapter {req.lora_name} is served", param="lora_name",
                           code="model_not_found")
        models.unload(req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    @router.get("/admin/models")
    async def list_models() -> AdminModelList:
        loading = [AdminModel(id=mid, name=mid.partition(":")[0], version=mid.partition(":")[2] or None, path="",
                              state="loading", default=False, memory_bytes=0, budget_bytes=0,
                              requests_in_flight=0, engine_pid=None, on_demand=False, base_model=None)
                   for mid in sorted(models.loading)]
        return AdminModelList(data=[_entry(models, m) for m in models.models.values()] + loading)

    @router.post("/admin/models", responses={409: {"description": "The model exists"},
                                       507: {"description": "It does not fit the memory budget"}})
    async def load_model(req: LoadModel) -> AdminModel:
        settings = req.model_dump(exclude_none=True, exclude={"model", "path"})
        try:
            spec = ModelSpec.named(req.model, req.path, settings)
        except ValueError as e:
            raise bad_request(str(e), "model") from None
        return _entry(models, await models.load(spec))

    @router.delete("/admin/models/{model:path}", responses={409: {"description": "The default of a name with others"}})
    async def unload_model(model: str) -> AdminModel:
        return _entry(models, models.unload(model))

    @router.put("/admin/models/{name}/default")
    async def set_default(name: str, req: SetDefault) -> AdminModelList:
        models.set_default(name, req.version)
        return AdminModelList(data=[_entry(models, m) for m in models.models.values() if m.name == name])

    return router

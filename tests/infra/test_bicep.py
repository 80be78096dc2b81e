"""The Azure templates in infra/, checked by structure.

The bicep CLI cannot be installed from a package registry here, so each template is
parsed with the tree-sitter Bicep grammar, and the checks read the declarations: API
versions, the resources the deployment needs, keyless access, role assignments and
their scopes, the app's probes, scaling and settings, and what the outputs expose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from client_api.settings import describe_settings
from inferencing.settings import DeploymentSettings
from intelligence.stores.cosmos import PARTITION_KEY_PATHS
from intelligence.stores.cosmos_audit import PARTITION_KEY_PATH
from tests.infra.bicep import BicepFile, Expr, Resource, Value, parse

INFRA = Path(__file__).resolve().parents[2] / "infra"
TEMPLATES = sorted(INFRA.rglob("*.bicep"))
MAIN = INFRA / "main.bicep"

# Current, generally available API versions (no previews) of every type the templates use.
API_VERSIONS = {
    "Microsoft.App/containerApps": {"2024-03-01", "2025-01-01"},
    "Microsoft.App/managedEnvironments": {"2024-03-01", "2025-01-01"},
    "Microsoft.Authorization/roleAssignments": {"2022-04-01"},
    "Microsoft.BotService/botServices": {"2022-09-15"},
    "Microsoft.BotService/botServices/channels": {"2022-09-15"},
    "Microsoft.Cache/redisEnterprise": {"2025-04-01", "2025-07-01"},
    "Microsoft.Cache/redisEnterprise/databases": {"2025-04-01", "2025-07-01"},
    "Microsoft.CognitiveServices/accounts": {"2024-10-01", "2025-06-01"},
    "Microsoft.CognitiveServices/accounts/deployments": {"2024-10-01", "2025-06-01"},
    "Microsoft.ContainerRegistry/registries": {"2023-07-01", "2025-04-01"},
    "Microsoft.DocumentDB/databaseAccounts": {"2024-11-15", "2025-04-15"},
    "Microsoft.DocumentDB/databaseAccounts/sqlDatabases": {"2024-11-15", "2025-04-15"},
    "Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers": {"2024-11-15", "2025-04-15"},
    "Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments": {"2024-11-15", "2025-04-15"},
    "Microsoft.DocumentDB/databaseAccounts/sqlRoleDefinitions": {"2024-11-15", "2025-04-15"},
    "Microsoft.Insights/components": {"2020-02-02"},
    "Microsoft.KeyVault/vaults": {"2023-07-01", "2024-11-01"},
    "Microsoft.KeyVault/vaults/secrets": {"2023-07-01", "2024-11-01"},
    "Microsoft.ManagedIdentity/userAssignedIdentities": {"2023-01-31", "2024-11-30"},
    "Microsoft.OperationalInsights/workspaces": {"2023-09-01", "2025-02-01"},
    "Microsoft.Search/searchServices": {"2023-11-01", "2025-05-01"},
}

# The built-in roles the app's identity is given (infra/README.md has the same table).
ROLES = {
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "Search Index Data Reader": "1407120a-92aa-4202-b7e9-c0e197c71c8f",
    "Cognitive Services OpenAI User": "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd",
    "Key Vault Secrets User": "4633458b-17de-408a-b874-0445c86b69e6",
    "AcrPull": "7f951dde-4a7a-4bc8-a2a4-1c5cd0dd3b1b",
}
COSMOS_DATA_CONTRIBUTOR = "00000000-0000-0000-0000-000000000002"
_COSMOS_CONTAINERS = "Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers"
# Cosmos NoSQL data actions (learn.microsoft.com: "Azure Cosmos DB for NoSQL data plane
# actions reference"): what the audit store does, and no more.
AUDIT_APPENDER_ACTIONS = {
    "Microsoft.DocumentDB/databaseAccounts/readMetadata",
    f"{_COSMOS_CONTAINERS}/items/create",
    f"{_COSMOS_CONTAINERS}/items/read",
    f"{_COSMOS_CONTAINERS}/executeQuery",
}
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def templates() -> dict[str, BicepFile]:
    return {str(path.relative_to(INFRA)): parse(path) for path in TEMPLATES}


@pytest.fixture(scope="module")
def main() -> BicepFile:
    return parse(MAIN)


def deployed(templates: dict[str, BicepFile]) -> list[Resource]:
    return [r for t in templates.values() for r in t.resources if not r.existing]


def only(templates: dict[str, BicepFile], resource_type: str) -> Resource:
    [found] = [r for r in deployed(templates) if r.type == resource_type]
    return found


def get(body: Value, *keys: str) -> Value:
    for key in keys:
        assert isinstance(body, dict), f"{key}: not an object"
        body = body.get(key)
    return body


def as_dict(body: Value) -> dict[str, Value]:
    assert isinstance(body, dict)
    return body


def as_list(body: Value) -> list[Value]:
    assert isinstance(body, list)
    return body


def test_every_template_parses_without_errors(templates: dict[str, BicepFile]) -> None:
    assert len(templates) >= 9
    for name, template in templates.items():
        assert template.errors == [], name


def test_every_resource_uses_a_current_api_version(templates: dict[str, BicepFile]) -> None:
    for name, template in templates.items():
        for resource in template.resources:
            allowed = API_VERSIONS.get(resource.type)
            assert allowed is not None, f"{name}: {resource.type} is not in the allow-list"
            assert resource.api_version in allowed, (
                f"{name}: {resource.type}@{resource.api_version}"
            )


def test_the_deployment_has_every_required_service(templates: dict[str, BicepFile]) -> None:
    types = {r.type for r in deployed(templates)}
    assert {
        "Microsoft.App/managedEnvironments",
        "Microsoft.App/containerApps",
        "Microsoft.ManagedIdentity/userAssignedIdentities",
        "Microsoft.Search/searchServices",
        "Microsoft.DocumentDB/databaseAccounts",
        "Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers",
        "Microsoft.CognitiveServices/accounts",
        "Microsoft.CognitiveServices/accounts/deployments",
        "Microsoft.KeyVault/vaults",
        "Microsoft.Cache/redisEnterprise",
        "Microsoft.Insights/components",
        "Microsoft.OperationalInsights/workspaces",
        "Microsoft.ContainerRegistry/registries",
    } <= types


def test_modules_resolve_and_receive_exactly_their_parameters(
    templates: dict[str, BicepFile], main: BicepFile
) -> None:
    # What the compiler would refuse: a missing module, an unknown or a missing parameter.
    assert main.modules
    for module in main.modules:
        target = templates.get(module.path)
        assert target is not None, f"{module.symbol}: {module.path} does not exist"
        passed = set(as_dict(module.body["params"]))
        required = {p.name for p in target.params.values() if not p.has_default}
        assert passed <= set(target.params), f"{module.path}: unknown {passed - set(target.params)}"
        assert required <= passed, f"{module.path}: missing {required - passed}"


def test_parameters_file_names_only_declared_parameters(main: BicepFile) -> None:
    example = json.loads((INFRA / "main.parameters.json").read_text())
    given = set(example["parameters"])
    assert given <= set(main.params), given - set(main.params)
    required = {p.name for p in main.params.values() if not p.has_default}
    assert required <= given
    for name in ("name", "location", "searchSku", "redisSku", "minReplicas", "maxReplicas"):
        assert name in main.params, name


def test_cosmos_containers_match_the_stores(templates: dict[str, BicepFile]) -> None:
    cosmos = templates["modules/cosmos.bicep"]
    conversations = get(cosmos.resource("conversations").body, "properties", "resource")
    assert get(conversations, "partitionKey") == {
        "paths": list(PARTITION_KEY_PATHS),
        "kind": "MultiHash",
        "version": 2,
    }
    # Per-item TTLs (retention) apply only when the container's default is -1.
    assert get(conversations, "defaultTtl") == -1
    audit = as_dict(get(cosmos.resource("audit").body, "properties", "resource"))
    assert get(audit, "partitionKey", "paths") == [PARTITION_KEY_PATH]
    assert "defaultTtl" not in audit  # the audit log never expires
    main = templates["main.bicep"]
    [module] = [m for m in main.modules if m.path == "modules/cosmos.bicep"]
    params = as_dict(module.body["params"])
    assert params["conversationsContainerName"] == "conversations"
    assert params["auditContainerName"] == "audit"


def test_services_that_can_refuse_keys_do(templates: dict[str, BicepFile]) -> None:
    cosmos = only(templates, "Microsoft.DocumentDB/databaseAccounts")
    assert get(cosmos.body, "properties", "disableLocalAuth") is True
    search = as_dict(get(only(templates, "Microsoft.Search/searchServices").body, "properties"))
    assert search["disableLocalAuth"] is True
    assert "authOptions" not in search  # it would turn keys back on (aadOrApiKey)
    openai = only(templates, "Microsoft.CognitiveServices/accounts")
    assert get(openai.body, "properties", "disableLocalAuth") is True
    # Entra tokens for Azure OpenAI need a custom subdomain.
    assert get(openai.body, "properties", "customSubDomainName") is not None
    insights = only(templates, "Microsoft.Insights/components")
    assert get(insights.body, "properties", "DisableLocalAuth") is True
    registry = as_dict(
        get(only(templates, "Microsoft.ContainerRegistry/registries").body, "properties")
    )
    assert registry["adminUserEnabled"] is False
    assert registry["anonymousPullEnabled"] is False
    vault = only(templates, "Microsoft.KeyVault/vaults")
    assert get(vault.body, "properties", "enableRbacAuthorization") is True


def test_the_redis_key_reaches_the_app_only_through_key_vault(
    templates: dict[str, BicepFile],
) -> None:
    redis = templates["modules/redis.bicep"]
    database = only(templates, "Microsoft.Cache/redisEnterprise/databases")
    props = as_dict(get(database.body, "properties"))
    assert props["clientProtocol"] == "Encrypted"
    assert props["evictionPolicy"] == "NoEviction"  # API keys and limits are data
    # The app's client is not cluster-aware: one endpoint in front of the shards.
    assert props["clusteringPolicy"] == "EnterpriseCluster"
    secret = redis.resource("redisUrl")
    assert secret.type == "Microsoft.KeyVault/vaults/secrets"
    url = get(secret.body, "properties", "value")
    assert isinstance(url, Expr) and url.text.startswith("'rediss://")
    assert "listKeys" not in " ".join(o.text for o in redis.outputs.values())


def role_guids(template: BicepFile, role_assignment: Resource) -> set[str]:
    """The role definition GUIDs an assignment may name, through the template's variables."""
    expression = get(role_assignment.body, "properties", "roleDefinitionId")
    assert isinstance(expression, Expr)
    names = set(re.findall(r"[A-Za-z_]\w*", expression.text))
    found: set[str] = set()
    while names:
        name = names.pop()
        variable = template.variables.get(name)
        if isinstance(variable, str) and GUID.match(variable):
            found.add(variable)
        elif isinstance(variable, Expr):
            names |= set(re.findall(r"[A-Za-z_]\w*", variable.text))
    return found


def test_role_assignments_use_named_roles_scoped_to_one_resource(
    templates: dict[str, BicepFile],
) -> None:
    granted: set[str] = set()
    for name, template in templates.items():
        for assignment in template.of_type("Microsoft.Authorization/roleAssignments"):
            guids = role_guids(template, assignment)
            assert guids and guids <= set(ROLES.values()), f"{name}: {assignment.symbol}"
            granted |= guids
            # Scoped to a resource this template declares, never the resource group.
            scope = assignment.body.get("scope")
            assert isinstance(scope, Expr), f"{name}: {assignment.symbol} has no scope"
            assert scope.text in {r.symbol for r in template.resources}, scope.text
            assert get(assignment.body, "properties", "principalType") == "ServicePrincipal"
    assert granted == set(ROLES.values())


def resolved(template: BicepFile, value: Value) -> Value:
    """A value with a bare variable reference replaced by the variable's declaration."""
    while isinstance(value, Expr) and value.text in template.variables:
        value = template.variables[value.text]
    return value


def cosmos_assignments(cosmos: BicepFile) -> dict[str, Resource]:
    """The app's Cosmos data-plane role assignments, by the container symbol they name."""
    by_container: dict[str, Resource] = {}
    for assignment in cosmos.of_type("Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments"):
        scope = resolved(cosmos, get(assignment.body, "properties", "scope"))
        assert isinstance(scope, Expr), assignment.symbol
        # One container each (the data plane's own scope form), never the database.
        found = re.fullmatch(
            r"'\$\{account\.id\}/dbs/\$\{database\.name\}/colls/\$\{(\w+)\.name\}'", scope.text
        )
        assert found, f"{assignment.symbol}: {scope.text} is not one container"
        container = cosmos.resource(found[1])
        assert container.type == _COSMOS_CONTAINERS
        assert found[1] not in by_container, f"two assignments on {found[1]}"
        by_container[found[1]] = assignment
    return by_container


def test_cosmos_conversations_get_data_contributor_on_that_container_only(
    templates: dict[str, BicepFile],
) -> None:
    cosmos = templates["modules/cosmos.bicep"]
    assignments = cosmos_assignments(cosmos)
    assert set(assignments) == {"conversations", "audit"}
    role = get(assignments["conversations"].body, "properties", "roleDefinitionId")
    assert isinstance(role, Expr)
    assert role.text == "'${account.id}/sqlRoleDefinitions/${dataContributor}'"
    assert cosmos.variables["dataContributor"] == COSMOS_DATA_CONTRIBUTOR


def test_the_audit_container_is_append_only_for_the_app(
    templates: dict[str, BicepFile],
) -> None:
    cosmos = templates["modules/cosmos.bicep"]
    audit = cosmos_assignments(cosmos)["audit"]
    role = get(audit.body, "properties", "roleDefinitionId")
    assert isinstance(role, Expr) and role.text.endswith(".id")
    definition = cosmos.resource(role.text.removesuffix(".id"))
    assert definition.type == "Microsoft.DocumentDB/databaseAccounts/sqlRoleDefinitions"
    props = as_dict(get(definition.body, "properties"))
    assert props["roleName"] == "Lamina Audit Appender"
    assert props["type"] == "CustomRole"
    # Assignable only where it is assigned: the audit container.
    [assignable] = as_list(props["assignableScopes"])
    assert assignable == get(audit.body, "properties", "scope")
    [permission] = as_list(props["permissions"])
    actions = resolved(cosmos, get(permission, "dataActions"))
    assert set(as_list(actions)) == AUDIT_APPENDER_ACTIONS
    for action in as_list(actions):
        assert isinstance(action, str)
        assert not action.endswith(("/replace", "/upsert", "/delete", "*")), action
    assert "notDataActions" not in as_dict(permission)  # unsupported: dataActions is the list


def test_the_app_may_only_read_the_search_index(templates: dict[str, BicepFile]) -> None:
    # Writing the index is for the ingestion identity (there is no Search adapter in the
    # app yet), so the serving app's identity gets Index Data Reader and nothing more.
    search = templates["modules/search.bicep"]
    [assignment] = search.of_type("Microsoft.Authorization/roleAssignments")
    assert role_guids(search, assignment) == {ROLES["Search Index Data Reader"]}
    assert "8ebe5a00-799e-43f5-93ac-243d3dce84a7" not in search.variables.values()  # Contributor


def container(templates: dict[str, BicepFile]) -> dict[str, Value]:
    app = only(templates, "Microsoft.App/containerApps")
    [lamina] = as_list(get(app.body, "properties", "template", "containers"))
    return as_dict(lamina)


def test_the_app_probes_health_and_scales_on_http_concurrency(
    templates: dict[str, BicepFile],
) -> None:
    app = only(templates, "Microsoft.App/containerApps")
    probes = {
        get(p, "type"): get(p, "httpGet", "path") for p in as_list(container(templates)["probes"])
    }
    assert probes["Liveness"] == "/healthz"
    assert probes["Readiness"] == "/readyz"
    scale = as_dict(get(app.body, "properties", "template", "scale"))
    assert scale["minReplicas"] == Expr("minReplicas")
    assert scale["maxReplicas"] == Expr("maxReplicas")
    [rule] = as_list(scale["rules"])
    assert get(rule, "http", "metadata", "concurrentRequests") == Expr("string(concurrentRequests)")
    assert get(app.body, "identity", "type") == "UserAssigned"
    assert get(app.body, "properties", "configuration", "ingress", "allowInsecure") is False


def app_env(main: BicepFile) -> dict[str, dict[str, Value]]:
    return {str(get(e, "name")): as_dict(e) for e in as_list(main.variables["appEnv"])}


def test_the_app_environment_names_real_settings(main: BicepFile) -> None:
    env = app_env(main)
    known = {row[0] for row in describe_settings()}
    lamina = {name for name in env if name.startswith("LAMINA_")}
    assert lamina <= known, lamina - known
    assert set(env) - lamina == {"AZURE_CLIENT_ID", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"}
    assert env["LAMINA_CONVERSATIONS__BACKEND"]["value"] == "cosmos"
    assert env["LAMINA_AUDIT__BACKEND"]["value"] == "cosmos"
    assert env["LAMINA_TELEMETRY__EXPORTERS"]["value"] == '["azure_monitor"]'
    for required in (
        "LAMINA_AUTH__OPENID_CONFIG_URL",
        "LAMINA_AUTH__AUDIENCE",
        "LAMINA_CONVERSATIONS__COSMOS__ENDPOINT",
        "LAMINA_AUDIT__COSMOS__ENDPOINT",
        "LAMINA_INFERENCING__DEPLOYMENTS",
        "LAMINA_TELEMETRY__AZURE_MONITOR_CONNECTION_STRING",
    ):
        assert required in env, required
    # The one secret is a reference to the Key Vault secret, never a literal.
    assert env["LAMINA_REDIS__URL"] == {"name": "LAMINA_REDIS__URL", "secretRef": "redis-url"}
    [module] = [m for m in main.modules if m.path == "modules/containerapp.bicep"]
    secrets = as_list(get(module.body, "params", "keyVaultSecrets"))
    assert [get(s, "name") for s in secrets] == ["redis-url"]


def test_the_model_registry_entries_are_valid_deployments(main: BicepFile) -> None:
    registry = main.variables["modelRegistry"]
    assert isinstance(registry, Expr)
    keys = set(re.findall(r"^\s*(\w+):", registry.text, re.MULTILINE))
    assert {"name", "provider", "azure_endpoint", "model"} <= keys
    assert keys <= set(DeploymentSettings.model_fields), keys - set(DeploymentSettings.model_fields)
    for deployment in as_list(main.params["chatDeployments"].default):
        entry = as_dict(deployment)
        DeploymentSettings(
            name=str(entry["name"]),
            provider="azure_openai",
            azure_endpoint="https://example.openai.azure.com/",
            model=str(entry["name"]),
            model_version=str(entry["version"]),
            tier=entry["tier"],  # type: ignore[arg-type]
        )


def test_outputs_expose_no_secrets(templates: dict[str, BicepFile]) -> None:
    secretive = re.compile(
        r"list\w*\(|primaryKey|secondaryKey|sharedKey|accessKey|connectionString|password|secret",
        re.IGNORECASE,
    )
    for name, template in templates.items():
        for output, expression in template.outputs.items():
            if output == "urlSecretUri":  # a Key Vault address, not its value
                continue
            assert not secretive.search(output + " " + expression.text), f"{name}: {output}"

// Lamina on Azure: Container Apps running the API, with Cosmos DB (conversations and
// audit), Azure AI Search, Azure OpenAI (chat and embedding deployments), Azure Managed
// Redis (state shared by replicas), Key Vault, and Application Insights on Log Analytics.
//
// One user-assigned identity is the app's only credential. It gets the least data-plane
// role each service offers, scoped to that resource; every service that can refuse keys
// does (Cosmos DB, AI Search, Azure OpenAI, Application Insights ingestion). Redis keeps
// its access key because the app's Redis client signs in with one; the URL carrying it
// sits in Key Vault and reaches the app as a Key Vault reference.
//
// Deploy into a resource group (see infra/README.md):
//   az deployment group create -g <rg> -f infra/main.bicep -p infra/main.parameters.json
// With containerImage empty everything but the app is created, so the image can be
// built into the new registry first (az acr build) and the app added by a second run.

targetScope = 'resourceGroup'

@description('Short name used in every resource name (lowercase letters and digits).')
@minLength(3)
@maxLength(12)
param name string = 'lamina'

@description('Region of every resource except Azure OpenAI.')
param location string = resourceGroup().location

@description('Region of the Azure OpenAI account (model availability differs by region).')
param openAiLocation string = location

param tags object = { application: 'lamina' }

@description('Image to run, e.g. <registry>.azurecr.io/lamina:1.0.0; empty: create everything but the app.')
param containerImage string = ''

@description('OpenID metadata of the Entra tenant that signs callers\' tokens (LAMINA_AUTH__OPENID_CONFIG_URL).')
param openidConfigUrl string

@description('Expected token audience: the API app registration\'s client id (LAMINA_AUTH__AUDIENCE).')
param audience string

@description('Fewest replicas; 0 lets the app scale to zero when idle.')
@minValue(0)
@maxValue(300)
param minReplicas int = 1

@description('Most replicas. Keep 1 while ingestion jobs and the knowledge index are embedded (docs/scaling.md).')
@minValue(1)
@maxValue(300)
param maxReplicas int = 1

@description('Concurrent HTTP requests per replica before another replica is added.')
@minValue(1)
param concurrentRequests int = 20

@description('vCPU per replica.')
param cpu string = '1.0'

@description('Memory per replica.')
param memory string = '2Gi'

@allowed([ 'basic', 'standard', 'standard2', 'standard3', 'storage_optimized_l1', 'storage_optimized_l2' ])
param searchSku string = 'basic'

@minValue(1)
@maxValue(12)
param searchReplicaCount int = 1

@minValue(1)
@maxValue(12)
param searchPartitionCount int = 1

@allowed([ 'disabled', 'free', 'standard' ])
param searchSemanticSearch string = 'free'

@description('Cosmos DB serverless; false: provisioned autoscale throughput on the database.')
param cosmosServerless bool = true

@minValue(1000)
param cosmosAutoscaleMaxThroughput int = 1000

@description('Chat deployments, also the model registry in this order: { name, model, version, sku, capacity, tier }.')
param chatDeployments array = [
  { name: 'gpt-4.1-mini', model: 'gpt-4.1-mini', version: '2025-04-14', sku: 'GlobalStandard', capacity: 50, tier: 'cheap' }
  { name: 'gpt-4.1', model: 'gpt-4.1', version: '2025-04-14', sku: 'GlobalStandard', capacity: 30, tier: 'strong' }
]

@description('The embedding deployment: { name, model, version, sku, capacity }.')
param embeddingDeployment object = {
  name: 'text-embedding-3-small'
  model: 'text-embedding-3-small'
  version: '1'
  sku: 'GlobalStandard'
  capacity: 50
}

@description('Azure Managed Redis SKU.')
param redisSku string = 'Balanced_B0'

@allowed([ 'standard', 'premium' ])
param keyVaultSku string = 'standard'

@allowed([ 'Basic', 'Standard', 'Premium' ])
param registrySku string = 'Basic'

@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

var suffix = uniqueString(resourceGroup().id, name)
var names = {
  identity: 'id-${name}'
  workspace: 'log-${name}-${suffix}'
  appInsights: 'appi-${name}-${suffix}'
  keyVault: 'kv-${name}-${take(suffix, 8)}'
  cosmos: 'cosmos-${name}-${suffix}'
  search: 'srch-${name}-${suffix}'
  openAi: 'oai-${name}-${suffix}'
  redis: 'redis-${name}-${suffix}'
  registry: 'cr${name}${suffix}'
  environment: 'cae-${name}'
  app: 'ca-${name}'
}
var cosmosDatabase = 'lamina'

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: names.identity
  location: location
  tags: tags
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    workspaceName: names.workspace
    appInsightsName: names.appInsights
    location: location
    tags: tags
    retentionInDays: logRetentionDays
    principalId: identity.properties.principalId
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: names.keyVault
    location: location
    tags: tags
    sku: keyVaultSku
  }
}

module cosmos 'modules/cosmos.bicep' = {
  name: 'cosmos'
  params: {
    accountName: names.cosmos
    location: location
    tags: tags
    serverless: cosmosServerless
    autoscaleMaxThroughput: cosmosAutoscaleMaxThroughput
    databaseName: cosmosDatabase
    conversationsContainerName: 'conversations'
    auditContainerName: 'audit'
    principalId: identity.properties.principalId
  }
}

module search 'modules/search.bicep' = {
  name: 'search'
  params: {
    name: names.search
    location: location
    tags: tags
    sku: searchSku
    replicaCount: searchReplicaCount
    partitionCount: searchPartitionCount
    semanticSearch: searchSemanticSearch
    principalId: identity.properties.principalId
  }
}

module openAi 'modules/openai.bicep' = {
  name: 'openai'
  params: {
    name: names.openAi
    location: openAiLocation
    tags: tags
    chatDeployments: chatDeployments
    embeddingDeployment: embeddingDeployment
    principalId: identity.properties.principalId
  }
}

module redis 'modules/redis.bicep' = {
  name: 'redis'
  params: {
    name: names.redis
    location: location
    tags: tags
    sku: redisSku
    keyVaultName: keyVault.outputs.name
    principalId: identity.properties.principalId
  }
}

module registry 'modules/registry.bicep' = {
  name: 'registry'
  params: {
    name: names.registry
    location: location
    tags: tags
    sku: registrySku
    principalId: identity.properties.principalId
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: names.appInsights
}

// The model registry (docs/gateway.md): the chat deployments, Entra-authenticated (no
// api_key), cheaper tiers for simple turns and stronger ones for complex turns.
var openAiEndpoint = 'https://${names.openAi}.openai.azure.com/'
var modelRegistry = [for (deployment, i) in chatDeployments: {
  name: deployment.name
  provider: 'azure_openai'
  azure_endpoint: openAiEndpoint
  model: deployment.name
  model_version: deployment.version
  tier: deployment.tier
  priority: (i + 1) * 10
}]

var appEnv = [
  // DefaultAzureCredential picks the user-assigned identity by its client id.
  { name: 'AZURE_CLIENT_ID', value: identity.properties.clientId }
  { name: 'LAMINA_AUTH__MODE', value: 'jwt' }
  { name: 'LAMINA_AUTH__OPENID_CONFIG_URL', value: openidConfigUrl }
  { name: 'LAMINA_AUTH__AUDIENCE', value: audience }
  { name: 'LAMINA_CONVERSATIONS__BACKEND', value: 'cosmos' }
  { name: 'LAMINA_CONVERSATIONS__COSMOS__ENDPOINT', value: cosmos.outputs.endpoint }
  { name: 'LAMINA_CONVERSATIONS__COSMOS__DATABASE', value: cosmos.outputs.databaseName }
  { name: 'LAMINA_CONVERSATIONS__COSMOS__CONTAINER', value: cosmos.outputs.conversationsContainerName }
  { name: 'LAMINA_AUDIT__BACKEND', value: 'cosmos' }
  { name: 'LAMINA_AUDIT__COSMOS__ENDPOINT', value: cosmos.outputs.endpoint }
  { name: 'LAMINA_AUDIT__COSMOS__DATABASE', value: cosmos.outputs.databaseName }
  { name: 'LAMINA_AUDIT__COSMOS__CONTAINER', value: cosmos.outputs.auditContainerName }
  { name: 'LAMINA_INFERENCING__DEPLOYMENTS', value: string(modelRegistry) }
  { name: 'LAMINA_REDIS__URL', secretRef: 'redis-url' }
  { name: 'LAMINA_TELEMETRY__EXPORTERS', value: '["azure_monitor"]' }
  { name: 'LAMINA_TELEMETRY__AZURE_MONITOR_CONNECTION_STRING', value: appInsights.properties.ConnectionString }
  // Entra ingestion: the connection string names the resource, the identity proves the sender.
  { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'Authorization=AAD;ClientId=${identity.properties.clientId}' }
]

module app 'modules/containerapp.bicep' = if (!empty(containerImage)) {
  name: 'containerapp'
  // Every role assignment exists before the first replica asks for a token.
  dependsOn: [ monitoring, cosmos, search, openAi ]
  params: {
    environmentName: names.environment
    appName: names.app
    location: location
    tags: tags
    workspaceName: monitoring.outputs.workspaceName
    identityId: identity.id
    image: containerImage
    registryServer: registry.outputs.loginServer
    env: appEnv
    keyVaultSecrets: [ { name: 'redis-url', keyVaultUrl: redis.outputs.urlSecretUri } ]
    minReplicas: minReplicas
    maxReplicas: maxReplicas
    concurrentRequests: concurrentRequests
    cpu: cpu
    memory: memory
  }
}

output appUrl string = empty(containerImage) ? '' : 'https://${app.outputs.fqdn}'
output identityClientId string = identity.properties.clientId
output identityPrincipalId string = identity.properties.principalId
output registryName string = registry.outputs.name
output registryLoginServer string = registry.outputs.loginServer
output cosmosEndpoint string = cosmos.outputs.endpoint
output searchEndpoint string = search.outputs.endpoint
output openAiEndpoint string = openAiEndpoint
output redisHostName string = redis.outputs.hostName
output keyVaultName string = keyVault.outputs.name
output appInsightsName string = monitoring.outputs.appInsightsName

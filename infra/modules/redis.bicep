// Azure Managed Redis: the state every replica shares (rate limits, quotas, API keys,
// breakers, usage, answer cache, approvals). Keys there are data, not cache: no
// eviction, and AOF persistence. EnterpriseCluster puts the cluster behind one endpoint,
// which the app's non-cluster client needs.
//
// The app's Redis client signs in with the URL's access key, so access keys stay on; the
// URL is written straight into Key Vault (never an output), and the app's identity may
// read that one secret.
//
// Known limitation: the endpoint is public. Azure Managed Redis has no IP firewall rules
// (only public access on or off, with private endpoints), and this deployment has no VNet,
// so the key and TLS are what guard it. Mitigation and the plan (Entra authentication
// for the app's Redis client): docs/security.md#azure-managed-redis-access-key-public-endpoint.

param name string
param location string
param tags object

@description('Azure Managed Redis SKU, e.g. Balanced_B0 (dev), Balanced_B5.')
param sku string

@description('Key Vault that receives the redis-url secret.')
param keyVaultName string

@description('Principal (object) id of the app\'s managed identity.')
param principalId string

var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'

resource cluster 'Microsoft.Cache/redisEnterprise@2025-07-01' = {
  name: name
  location: location
  tags: tags
  sku: { name: sku }
  properties: {
    minimumTlsVersion: '1.2'
    highAvailability: 'Enabled'
    publicNetworkAccess: 'Enabled'
  }
}

resource database 'Microsoft.Cache/redisEnterprise/databases@2025-07-01' = {
  parent: cluster
  name: 'default'
  properties: {
    clientProtocol: 'Encrypted'
    port: 10000
    clusteringPolicy: 'EnterpriseCluster'
    evictionPolicy: 'NoEviction'
    persistence: { aofEnabled: true, aofFrequency: '1s' }
    accessKeysAuthentication: 'Enabled'
  }
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource redisUrl 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: 'redis-url'
  properties: {
    contentType: 'text/uri'
    value: 'rediss://:${database.listKeys().primaryKey}@${cluster.properties.hostName}:10000/0'
  }
}

// Scoped to the one secret, not the vault.
resource readRedisUrl 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(redisUrl.id, principalId, keyVaultSecretsUser)
  scope: redisUrl
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output hostName string = cluster.properties.hostName
output urlSecretUri string = redisUrl.properties.secretUri

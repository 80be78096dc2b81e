// Key Vault for the few secrets the app cannot avoid (the Redis URL, whose client signs
// in with an access key). RBAC authorization, so access is granted per secret by role
// assignment; soft delete and purge protection, so a deleted secret can be recovered.

param name string
param location string
param tags object

@allowed([ 'standard', 'premium' ])
param sku string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: { family: 'A', name: sku }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
  }
}

output name string = vault.name

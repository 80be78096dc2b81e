// Azure Container Registry for the Lamina image (built with `az acr build`, no local
// Docker needed). No admin user and no anonymous pull: the app's identity pulls with
// AcrPull on this registry only.

param name string
param location string
param tags object

@allowed([ 'Basic', 'Standard', 'Premium' ])
param sku string

@description('Principal (object) id of the app\'s managed identity.')
param principalId string

var acrPull = '7f951dde-4a7a-4bc8-a2a4-1c5cd0dd3b1b'

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  name: name
  location: location
  tags: tags
  sku: { name: sku }
  properties: {
    adminUserEnabled: false
    anonymousPullEnabled: false
    publicNetworkAccess: 'Enabled'
  }
}

resource pull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, principalId, acrPull)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPull)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output name string = registry.name
output loginServer string = registry.properties.loginServer
